//! One store suite, run against SQLite (a temp file) and PostgreSQL (a fresh database on the
//! server named by `SANDPIT_TEST_POSTGRES`, e.g. `postgres://postgres@127.0.0.1:54329`;
//! `scripts/test` starts one from Debian's package). Without that variable the PostgreSQL
//! half is skipped with a note, unless `SANDPIT_REQUIRE_POSTGRES=1` (set by `scripts/test`)
//! makes its absence a failure.

use std::collections::BTreeMap;

use sandpit_api_types::{EgressPolicy, PreviewPrivacy, SandboxMode};

use super::*;
use crate::domain::{Status, Stored};

/// A database for one test, dropped (PostgreSQL) or deleted (SQLite) with it.
struct TestDb {
    store: Store,
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        TestDb {
            store: Store::connect(&url).await.unwrap(),
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    async fn postgres() -> Option<TestDb> {
        let Ok(base) = std::env::var("SANDPIT_TEST_POSTGRES") else {
            assert!(
                std::env::var("SANDPIT_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "SANDPIT_REQUIRE_POSTGRES=1 but SANDPIT_TEST_POSTGRES is not set"
            );
            eprintln!("SKIPPED the PostgreSQL half: SANDPIT_TEST_POSTGRES is not set");
            return None;
        };
        let base = base.trim_end_matches('/').to_string();
        let name = format!("sandpit_t_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&format!("{base}/postgres"))
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = format!("{base}/{name}");
        Some(TestDb {
            store: Store::connect(&url).await.unwrap(),
            url,
            _dir: None,
            pg: Some((base, name)),
        })
    }

    /// A second, independent connection pool on the same database: another process.
    async fn another_process(&self) -> Store {
        Store::connect(&self.url).await.unwrap()
    }

    async fn drop_db(self) {
        self.store.db().close().await;
        if let Some((base, name)) = self.pg {
            let admin = sqlx::PgPool::connect(&format!("{base}/postgres"))
                .await
                .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&admin)
            .await
            .unwrap();
        }
    }
}

/// Run a suite function against both databases.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let db = super::TestDb::sqlite().await;
                super::$name(&db).await;
                db.drop_db().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(db) = super::TestDb::postgres().await {
                    super::$name(&db).await;
                    db.drop_db().await;
                }
            }
        }
    };
}

async fn workspace(s: &Store, id: &str) {
    let org = format!("org_{id}");
    s.tenants.insert_org(&org, "o", 1).await.unwrap();
    s.tenants
        .insert_workspace(
            &WorkspaceRow {
                id: id.into(),
                org_id: org,
                name: "w".into(),
            },
            1,
        )
        .await
        .unwrap();
}

fn template(id: &str, name: &str, ws: &str) -> TemplateRow {
    TemplateRow {
        workspace_id: Some(ws.into()),
        status: TemplateStatus::Building,
        source: "dockerfile".into(),
        ..TemplateRow::builtin(id, name, "t", "/rootfs".into(), 5)
    }
}

fn sandbox(id: &str, ws: &str, status: Status, slot: Option<i64>) -> Sandbox {
    let env: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
    Sandbox {
        id: id.into(),
        workspace_id: ws.into(),
        template_id: "tpl_base".into(),
        template_name: "base".into(),
        mode: SandboxMode::Ephemeral,
        status,
        size: "small".into(),
        env: Stored::encode(&env),
        metadata: Stored::encode(&BTreeMap::new()),
        egress: Stored::encode(&EgressPolicy::default()),
        timeout_ms: Some(1000),
        idle_timeout_ms: None,
        expires_at: Some(2000),
        last_active_at: 10,
        slot,
        runtime_id: format!("rt-{id}"),
        error: None,
        created_at: 10,
        updated_at: 10,
        preview_privacy: PreviewPrivacy::Private,
        node_id: "n1".into(),
        remote_image: None,
    }
}

async fn base_template(s: &Store) {
    s.templates
        .upsert(&TemplateRow::builtin(
            "tpl_base",
            "base",
            "b",
            "/r".into(),
            1,
        ))
        .await
        .unwrap();
}

async fn tenants_and_tokens(db: &TestDb) {
    let s = &db.store;
    assert_eq!(
        s.tenants.count_orgs().await.unwrap(),
        0,
        "the system org is not counted"
    );
    workspace(s, "ws_a").await;
    assert_eq!(s.tenants.count_orgs().await.unwrap(), 1);
    let ws = s
        .tenants
        .get_workspace("org_ws_a", "ws_a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ws.name, "w");
    assert!(
        s.tenants
            .get_workspace("org_other", "ws_a")
            .await
            .unwrap()
            .is_none()
    );

    let mut t = TokenRow {
        id: "tok_1".into(),
        workspace_id: "ws_a".into(),
        description: Some("d".into()),
        scopes: r#"["sandboxes"]"#.into(),
        expires_at: None,
        created_at: 3,
    };
    s.tenants.insert_token(&t, "hash1").await.unwrap();
    let auth = s.tenants.token_by_hash("hash1").await.unwrap().unwrap();
    assert_eq!(
        (auth.workspace_id.as_str(), auth.org_id.as_str()),
        ("ws_a", "org_ws_a")
    );
    assert!(s.tenants.token_by_hash("hash2").await.unwrap().is_none());
    // The same hash twice is refused (tokens are unique).
    assert!(
        s.tenants
            .insert_token(
                &TokenRow {
                    id: "tok_2".into(),
                    ..t.clone()
                },
                "hash1"
            )
            .await
            .is_err()
    );
    t.expires_at = Some(99);
    s.tenants.update_token(&t).await.unwrap();
    assert_eq!(
        s.tenants
            .get_token("ws_a", "tok_1")
            .await
            .unwrap()
            .unwrap()
            .expires_at,
        Some(99)
    );
    assert!(
        s.tenants
            .get_token("ws_b", "tok_1")
            .await
            .unwrap()
            .is_none(),
        "scoped by workspace"
    );
    assert!(!s.tenants.delete_token("ws_b", "tok_1").await.unwrap());
    assert!(s.tenants.delete_token("ws_a", "tok_1").await.unwrap());
    assert!(s.tenants.token_by_hash("hash1").await.unwrap().is_none());
}
both!(tenants_and_tokens);

async fn templates_names_limits_and_aliases(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    workspace(s, "ws_b").await;
    base_template(s).await;
    use TemplateInsert::*;
    assert_eq!(
        s.templates
            .insert(&template("t1", "web", "ws_a"), 3, 2, "n1")
            .await
            .unwrap(),
        Inserted { version: 1 }
    );
    assert_eq!(
        s.templates
            .insert(&template("t3", "base", "ws_a"), 3, 2, "n1")
            .await
            .unwrap(),
        NameTaken,
        "a built-in name"
    );
    assert_eq!(
        s.templates
            .insert(&template("t4", "web", "ws_b"), 3, 2, "n1")
            .await
            .unwrap(),
        Inserted { version: 1 },
        "names are per workspace"
    );
    assert_eq!(
        s.templates
            .insert(&template("t5", "api", "ws_a"), 3, 2, "n1")
            .await
            .unwrap(),
        Inserted { version: 1 }
    );
    assert_eq!(
        s.templates
            .insert(&template("t6", "db", "ws_a"), 3, 2, "n1")
            .await
            .unwrap(),
        TooManyBuilds
    );
    assert_eq!(s.templates.count("ws_a").await.unwrap(), (2, 2));

    assert!(
        s.templates
            .claim_build("t1", &[TemplateStatus::Ready], "n1", 6)
            .await
            .is_ok_and(|won| !won)
    );
    s.templates
        .finish_build("t1", TemplateStatus::Ready, "[]", "{}", None, 7)
        .await
        .unwrap();
    assert_eq!(
        s.templates
            .insert(&template("t6", "db", "ws_a"), 3, 2, "n1")
            .await
            .unwrap(),
        Inserted { version: 1 }
    );
    assert_eq!(
        s.templates
            .insert(&template("t7", "x", "ws_a"), 3, 0, "n1")
            .await
            .unwrap(),
        TooManyTemplates
    );

    let found = s.templates.find("ws_a", "web").await.unwrap().unwrap();
    assert_eq!(
        (found.id.as_str(), found.status),
        ("t1", TemplateStatus::Ready)
    );
    assert!(
        s.templates.find("ws_b", "t1").await.unwrap().is_none(),
        "another workspace's id"
    );
    assert!(
        s.templates.find("ws_b", "base").await.unwrap().is_some(),
        "built-in ones are everyone's"
    );
    let names: Vec<String> = s
        .templates
        .list("ws_a")
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["api", "base", "db", "web"]);

    s.templates
        .set_alias("ws_a", "me", "prod", "t1", 8)
        .await
        .unwrap();
    assert_eq!(
        s.templates
            .find("ws_a", "me@prod")
            .await
            .unwrap()
            .unwrap()
            .id,
        "t1"
    );
    assert!(s.templates.find("ws_b", "me@prod").await.unwrap().is_none());
    s.templates
        .set_alias("ws_a", "me", "prod", "t5", 9)
        .await
        .unwrap();
    assert_eq!(
        s.templates.aliases_of("ws_a", "t5").await.unwrap(),
        ["me@prod"]
    );

    // Delete drops the aliases, keeps the row; the name's next version is 2 (numbers are
    // never reused).
    assert!(
        !s.templates.delete("ws_b", "t5", 10).await.unwrap(),
        "not ws_b's"
    );
    assert!(s.templates.delete("ws_a", "t5", 10).await.unwrap());
    assert!(
        s.templates
            .resolve_alias("ws_a", "me", "prod")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        s.templates.by_id("t5").await.unwrap().unwrap().status,
        TemplateStatus::Deleted
    );
    assert_eq!(
        s.templates
            .insert(&template("t8", "api", "ws_a"), 3, 0, "n1")
            .await
            .unwrap(),
        Inserted { version: 2 }
    );
    // Another node's build: it goes on when n1 restarts, and fails when n2 is lost.
    assert_eq!(
        s.templates
            .insert(&template("t9", "other", "ws_b"), 0, 0, "n2")
            .await
            .unwrap(),
        Inserted { version: 1 }
    );
    assert_eq!(
        s.templates.build_node("t9").await.unwrap().as_deref(),
        Some("n2")
    );

    assert_eq!(
        s.templates
            .fail_interrupted_builds("n1", "stopped", 11)
            .await
            .unwrap(),
        3,
        "t4, t6, t8"
    );
    assert_eq!(
        s.templates.by_id("t9").await.unwrap().unwrap().status,
        TemplateStatus::Building
    );
    assert_eq!(
        s.templates
            .fail_builds_on_lost_nodes("lost", 11)
            .await
            .unwrap(),
        0,
        "n2 is not lost"
    );
    assert_eq!(
        s.templates.by_id("t8").await.unwrap().unwrap().status,
        TemplateStatus::Failed
    );
    assert!(
        s.templates
            .claim_build(
                "t8",
                &[TemplateStatus::NotBuilt, TemplateStatus::Failed],
                "n1",
                12
            )
            .await
            .unwrap()
    );
    assert!(
        !s.templates
            .claim_build(
                "t8",
                &[TemplateStatus::NotBuilt, TemplateStatus::Failed],
                "n1",
                12
            )
            .await
            .unwrap()
    );
}
both!(templates_names_limits_and_aliases);

/// Quotas hold across processes: two stores (two pools, as two API replicas would have)
/// race 24 template creates with a limit of 5; exactly 5 are made.
async fn template_quota_holds_across_processes(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    let other = db.another_process().await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let st = if i % 2 == 0 { s.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move {
            st.templates
                .insert(
                    &template(&format!("t{i}"), &format!("n{i}"), "ws_a"),
                    5,
                    0,
                    "n1",
                )
                .await
                .unwrap()
        }));
    }
    let mut inserted = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), TemplateInsert::Inserted { .. }) {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 5);
    assert_eq!(s.templates.count("ws_a").await.unwrap().0, 5);
    other.db().close().await;
}
both!(template_quota_holds_across_processes);

/// Versions: a name's builds number 1, 2, 3 (two stores racing on one name never share a
/// number); `name` is its highest ready version (a building or failed one never moves
/// it), `name:N` that version; hostile version strings are refused before any lookup;
/// aliases stay where they point; what GC may collect follows the rows.
async fn template_versions(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    use TemplateInsert::*;
    let v = |id: &str| template(id, "web", "ws_a");
    assert_eq!(
        s.templates.insert(&v("w1"), 0, 0, "n1").await.unwrap(),
        Inserted { version: 1 }
    );
    // Only a building version: the name finds it (so a first build can be followed).
    assert_eq!(
        s.templates.find("ws_a", "web").await.unwrap().unwrap().id,
        "w1"
    );
    s.templates
        .finish_build("w1", TemplateStatus::Ready, r#"["/l/a"]"#, "{}", None, 6)
        .await
        .unwrap();
    let other = db.another_process().await;
    let (w2, w3) = (v("w2"), v("w3"));
    let (a, b) = tokio::join!(
        s.templates.insert(&w2, 0, 0, "n1"),
        other.templates.insert(&w3, 0, 0, "n1")
    );
    let mut got = [a.unwrap(), b.unwrap()];
    got.sort_by_key(|i| match i {
        Inserted { version } => *version,
        _ => 0,
    });
    assert_eq!(got, [Inserted { version: 2 }, Inserted { version: 3 }]);
    other.db().close().await;
    let id_of = |n: &str| {
        let n = n.to_string();
        async move {
            s.templates
                .find("ws_a", &n)
                .await
                .unwrap()
                .map(|t| (t.id, t.version))
        }
    };
    assert_eq!(
        id_of("web").await.map(|t| t.1),
        Some(1),
        "building versions do not move it"
    );
    let v3 = s.templates.find("ws_a", "web:3").await.unwrap().unwrap();
    s.templates
        .finish_build(&v3.id, TemplateStatus::Failed, "[]", "{}", Some("boom"), 7)
        .await
        .unwrap();
    let v2 = s.templates.find("ws_a", "web:2").await.unwrap().unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(
        id_of("web").await.map(|t| t.1),
        Some(1),
        "a failed build does not move it"
    );
    s.templates
        .finish_build(&v2.id, TemplateStatus::Ready, r#"["/l/b"]"#, "{}", None, 8)
        .await
        .unwrap();
    assert_eq!(id_of("web").await, Some((v2.id.clone(), 2)));
    assert_eq!(id_of("web:1").await, Some(("w1".into(), 1)));
    assert_eq!(id_of("web:4").await, None);
    assert_eq!(id_of("base:1").await.map(|t| t.0), Some("tpl_base".into()));
    for bad in [
        "web:0",
        "web:abc",
        "web:1:2",
        "web:",
        ":1",
        "web:01",
        "web:+1",
        "web:-1",
        "web:99999999999999999999",
        "web:4294967297",
        "web:1000001",
    ] {
        let e = s.templates.find("ws_a", bad).await.unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::Invalid {
                    code: "invalid_template_version",
                    ..
                }
            ),
            "{bad}: {e:?}"
        );
    }
    let versions: Vec<u32> = s
        .templates
        .versions("ws_a", "web")
        .await
        .unwrap()
        .iter()
        .map(|t| t.version)
        .collect();
    assert_eq!(versions, [1, 2, 3]);

    // An alias points at a version; a newer ready version does not move it.
    s.templates
        .set_alias("ws_a", "me", "web", "w1", 9)
        .await
        .unwrap();
    assert_eq!(id_of("me@web").await.map(|t| t.1), Some(1));

    // Deleting a version keeps its number: the next build is 4, `web:1` is gone, and
    // its layers stay "in use" only within the grace period or while a sandbox needs it.
    assert!(s.templates.delete("ws_a", "w1", 100).await.unwrap());
    assert_eq!(id_of("web:1").await, None);
    assert_eq!(id_of("me@web").await, None, "its aliases went with it");
    assert_eq!(
        s.templates.insert(&v("w4"), 0, 0, "n1").await.unwrap(),
        Inserted { version: 4 }
    );
    let in_use = |since: i64| async move {
        let mut l = s.templates.layers_in_use(since).await.unwrap();
        l.sort();
        l.dedup();
        l
    };
    assert!(
        in_use(100).await.contains(&r#"["/l/a"]"#.to_string()),
        "deleted just now"
    );
    assert!(!in_use(101).await.contains(&r#"["/l/a"]"#.to_string()));
    assert!(in_use(101).await.contains(&r#"["/l/b"]"#.to_string()));
    assert_eq!(s.templates.deleted_unused(101).await.unwrap(), ["w1"]);
    assert!(s.templates.deleted_unused(100).await.unwrap().is_empty());
    let mut sb = sandbox("sb_1", "ws_a", Status::Running, Some(1));
    sb.template_id = "w1".into();
    s.sandboxes.insert(&sb).await.unwrap();
    assert!(
        in_use(101).await.contains(&r#"["/l/a"]"#.to_string()),
        "a sandbox runs on it"
    );
    assert!(s.templates.deleted_unused(101).await.unwrap().is_empty());
}
both!(template_versions);

async fn sandboxes_typed_rows_and_transitions(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    s.sandboxes
        .insert(&sandbox("sb_1", "ws_a", Status::Creating, Some(1)))
        .await
        .unwrap();
    s.sandboxes
        .insert(&sandbox("sb_2", "ws_a", Status::Running, Some(2)))
        .await
        .unwrap();
    assert!(
        s.sandboxes
            .insert(&sandbox("sb_3", "ws_a", Status::Running, Some(2)))
            .await
            .is_err(),
        "a slot is held once"
    );

    let got = s.sandboxes.get("sb_1").await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.mode, got.slot),
        (Status::Creating, SandboxMode::Ephemeral, Some(1))
    );
    let env = got.env.decode(|| "env".into()).unwrap();
    assert_eq!(env.get("A").map(String::as_str), Some("1"));
    assert_eq!(s.sandboxes.count_running("ws_a").await.unwrap(), 2);

    s.sandboxes
        .transition("sb_1", crate::Transition::Started, None, 20)
        .await
        .unwrap();
    s.sandboxes
        .mark_suspended("sb_2", Some("idle"), 21)
        .await
        .unwrap();
    let sb2 = s.sandboxes.get("sb_2").await.unwrap().unwrap();
    assert_eq!(
        (sb2.status, sb2.slot, sb2.error.as_deref()),
        (Status::Suspended, None, Some("idle"))
    );
    assert_eq!(s.sandboxes.used_slots("n1").await.unwrap(), [1]);
    s.sandboxes
        .claim_slot_admitted(&sb2, 7, 0, 22)
        .await
        .unwrap();
    s.sandboxes
        .transition("sb_2", crate::Transition::Wake, None, 22)
        .await
        .unwrap();
    let mut slots = s.sandboxes.used_slots("n1").await.unwrap();
    slots.sort();
    assert_eq!(slots, [1, 7]);

    let listed = s
        .sandboxes
        .list("ws_a", Some(Status::Running))
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert!(s.sandboxes.list("ws_b", None).await.unwrap().is_empty());
    let some = s
        .sandboxes
        .with_status("n1", &[Status::Suspended, Status::Running])
        .await
        .unwrap();
    assert_eq!(some.len(), 2);
    assert!(s.sandboxes.with_status("n1", &[]).await.unwrap().is_empty());
    assert_eq!(s.sandboxes.running("n1").await.unwrap().len(), 2);
    assert_eq!(s.sandboxes.expired("n1", 2000).await.unwrap().len(), 2);
    assert!(s.sandboxes.expired("n1", 1999).await.unwrap().is_empty());

    let deny = Stored::encode(&EgressPolicy {
        mode: "deny_all".into(),
        ..EgressPolicy::default()
    });
    s.sandboxes.set_egress("sb_1", &deny, 23).await.unwrap();
    assert_eq!(s.sandboxes.get("sb_1").await.unwrap().unwrap().egress, deny);
    s.sandboxes
        .set_preview_privacy("sb_1", PreviewPrivacy::Public, 24)
        .await
        .unwrap();
    assert_eq!(
        s.sandboxes
            .get("sb_1")
            .await
            .unwrap()
            .unwrap()
            .preview_privacy,
        PreviewPrivacy::Public
    );

    s.sandboxes.mark_failed("sb_1", "boom", 25).await.unwrap();
    s.sandboxes.mark_destroyed("sb_2", 26).await.unwrap();
    assert!(
        s.sandboxes.used_slots("n1").await.unwrap().is_empty(),
        "final states hold no slot"
    );
    let l = s.sandboxes.list("ws_a", None).await.unwrap();
    assert_eq!(
        l.iter().map(|x| x.status).collect::<Vec<_>>(),
        [Status::Failed],
        "destroyed ones are not listed"
    );
}
both!(sandboxes_typed_rows_and_transitions);

/// A value no version wrote fails closed at the store edge, naming the row and field; a
/// JSON record that does not decode fails only when it is needed.
async fn corrupt_rows_fail_closed(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    s.sandboxes
        .insert(&sandbox("sb_1", "ws_a", Status::Running, Some(1)))
        .await
        .unwrap();
    with_db!(s.db(), p => sqlx::query("UPDATE sandboxes SET egress = 'allow_all?' WHERE id = 'sb_1'")
        .execute(p).await.map(|_| ())).unwrap();
    let sb = s.sandboxes.get("sb_1").await.unwrap().unwrap();
    let e = sb
        .egress
        .decode(|| "egress policy of sb_1".into())
        .unwrap_err();
    assert!(matches!(e, ControlError::Corrupt { .. }), "{e}");

    with_db!(s.db(), p => sqlx::query("UPDATE sandboxes SET status = 'zombie' WHERE id = 'sb_1'")
        .execute(p).await.map(|_| ()))
    .unwrap();
    let e = s.sandboxes.get("sb_1").await.unwrap_err();
    assert!(e.to_string().contains("status of sandbox sb_1"), "{e}");
    assert!(
        s.sandboxes.list("ws_a", None).await.is_err(),
        "no default stands in"
    );

    with_db!(s.db(), p => sqlx::query("UPDATE templates SET status = 'half' WHERE id = 'tpl_base'")
        .execute(p).await.map(|_| ()))
    .unwrap();
    assert!(matches!(
        s.templates.by_id("tpl_base").await,
        Err(ControlError::Corrupt { .. })
    ));
}
both!(corrupt_rows_fail_closed);

/// Ten pooled sandboxes, twenty creates from two processes: each pooled sandbox goes to
/// exactly one create.
async fn pooled_sandboxes_go_to_one_create_each(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    for i in 0..10 {
        let mut sb = sandbox(&format!("pool{i}"), "ws_system", Status::Pooled, Some(i));
        sb.created_at = i;
        s.sandboxes.insert(&sb).await.unwrap();
    }
    assert_eq!(
        s.sandboxes.pooled_count("n1", "tpl_base").await.unwrap(),
        10
    );
    let other = db.another_process().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let st = if i % 2 == 0 { s.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move {
            let owner = sandbox(&format!("req{i}"), "ws_a", Status::Running, None);
            st.sandboxes
                .take_pooled("tpl_base", &owner, 0)
                .await
                .unwrap()
        }));
    }
    let mut got: Vec<String> = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap());
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 10, "{got:?}");
    assert_eq!(s.sandboxes.pooled_count("n1", "tpl_base").await.unwrap(), 0);
    assert_eq!(
        s.sandboxes
            .list("ws_a", Some(Status::Running))
            .await
            .unwrap()
            .len(),
        10
    );
    other.db().close().await;
}
both!(pooled_sandboxes_go_to_one_create_each);

async fn previews_snapshots_and_idempotency(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    s.sandboxes
        .insert(&sandbox("sb_1", "ws_a", Status::Running, Some(1)))
        .await
        .unwrap();

    let t = PreviewTokenRow {
        id: "pt_1".into(),
        sandbox_id: "sb_1".into(),
        workspace_id: "ws_a".into(),
        token_prefix: "abc".into(),
        expires_at: None,
        revoked_at: None,
        created_at: 1,
    };
    s.previews.insert_token(&t, "h").await.unwrap();
    assert!(
        s.previews
            .token_by_hash("sb_1", "h")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s.previews
            .token_by_hash("sb_2", "h")
            .await
            .unwrap()
            .is_none(),
        "scoped by sandbox"
    );
    s.previews
        .set_token_expiry("ws_a", "pt_1", Some(50))
        .await
        .unwrap();
    s.previews.revoke_token("ws_a", "pt_1", 60).await.unwrap();
    assert!(
        s.previews
            .list_tokens("ws_a", "sb_1")
            .await
            .unwrap()
            .is_empty()
    );
    let revoked = s
        .previews
        .get_token("ws_a", "sb_1", "pt_1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (revoked.expires_at, revoked.revoked_at),
        (Some(50), Some(60))
    );

    let snap = |id: &str| SnapshotRow {
        id: id.into(),
        workspace_id: "ws_a".into(),
        sandbox_id: "sb_1".into(),
        template_id: "tpl_base".into(),
        template_name: "base".into(),
        size: "small".into(),
        env: "{}".into(),
        egress: "{}".into(),
        has_memory: true,
        size_bytes: 42,
        created_at: 1,
        remote_image: None,
    };
    assert!(s.snapshots.insert(&snap("sn_1"), 2).await.unwrap());
    assert!(s.snapshots.insert(&snap("sn_2"), 2).await.unwrap());
    assert!(
        !s.snapshots.insert(&snap("sn_3"), 2).await.unwrap(),
        "the limit"
    );
    let got = s.snapshots.get("ws_a", "sn_1").await.unwrap().unwrap();
    assert!(got.has_memory);
    assert_eq!(s.snapshots.list("ws_a", "sb_1").await.unwrap().len(), 2);
    assert!(s.snapshots.get("ws_b", "sn_1").await.unwrap().is_none());
    // The remote image record is compare-and-set.
    let sn = &s.snapshots;
    assert!(sn.set_remote_image("sn_1", None, Some("a")).await.unwrap());
    assert!(!sn.set_remote_image("sn_1", None, Some("b")).await.unwrap());
    assert!(
        !sn.set_remote_image("sn_1", Some("x"), Some("b"))
            .await
            .unwrap()
    );
    assert!(
        sn.set_remote_image("sn_1", Some("a"), Some("b"))
            .await
            .unwrap()
    );
    let got = sn.by_id("sn_1").await.unwrap().unwrap();
    assert_eq!(got.remote_image.as_deref(), Some("b"));
    assert!(s.snapshots.delete("ws_a", "sn_1").await.unwrap());
    assert!(!sn.set_remote_image("sn_1", Some("b"), None).await.unwrap());
    assert!(sn.by_id("sn_1").await.unwrap().is_none());
    assert_eq!(s.snapshots.ids().await.unwrap(), ["sn_2"]);

    // Layers in object storage: the first record of a layer id stays.
    let l = &s.layers;
    assert!(l.record("b0123", "ref-1", 10, 5).await.unwrap());
    assert!(!l.record("b0123", "ref-2", 11, 6).await.unwrap());
    assert_eq!(l.get("b0123").await.unwrap().unwrap().reference, "ref-1");
    assert!(l.get("b9999").await.unwrap().is_none());
    let ids = ["b0123".to_string(), "b9999".to_string()];
    assert_eq!(l.stored(&ids).await.unwrap(), ["b0123"]);
    assert!(l.stored(&[]).await.unwrap().is_empty());
    l.forget("b0123").await.unwrap();
    assert!(l.get("b0123").await.unwrap().is_none());

    let i = &s.idempotency;
    assert!(
        i.begin("n1", "ws_a", "k", "h1", 1, 100)
            .await
            .unwrap()
            .is_none(),
        "first owns it"
    );
    let pending = i
        .begin("n1", "ws_a", "k", "h1", 2, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pending.status, None);
    i.finish("ws_a", "k", 201, "{}").await.unwrap();
    let done = i
        .begin("n1", "ws_a", "k", "h2", 3, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((done.request_hash.as_str(), done.status), ("h1", Some(201)));
    assert!(
        i.begin("n1", "ws_a", "k", "h1", 100, 200)
            .await
            .unwrap()
            .is_none(),
        "expired keys go"
    );
    i.abandon("ws_a", "k").await.unwrap();
    assert!(
        i.begin("n1", "ws_a", "k", "h3", 101, 200)
            .await
            .unwrap()
            .is_none()
    );
    // A key pending on another node survives this node's restart.
    assert!(
        i.begin("n2", "ws_a", "k2", "h1", 101, 200)
            .await
            .unwrap()
            .is_none()
    );
    i.clear_pending("n1").await.unwrap();
    assert!(
        i.begin("n1", "ws_a", "k", "h4", 102, 200)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        i.begin("n1", "ws_a", "k2", "h1", 103, 200)
            .await
            .unwrap()
            .is_some_and(|row| row.status.is_none()),
        "n2's request is still running"
    );
}
both!(previews_snapshots_and_idempotency);

#[tokio::test]
async fn unknown_database_urls_are_refused_without_echoing_them() {
    let e = Store::connect("mysql://user:secret@db/x")
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, ControlError::UnsupportedDatabase { .. }));
    assert!(!text.contains("secret"), "{text}");
}

/// The running quota holds across processes: 16 creates from two stores race for a limit of
/// 5; exactly 5 rows are made, the rest are `running_quota_exceeded` and change nothing. A
/// suspended sandbox being woken (holding a slot) counts; a pooled take over the quota
/// leaves the pool as it was.
async fn running_quota_holds_across_processes(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    let other = db.another_process().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let st = if i % 2 == 0 { s.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move {
            let sb = sandbox(&format!("sb_{i}"), "ws_a", Status::Creating, Some(i));
            st.sandboxes.insert_admitted(&sb, 5).await
        }));
    }
    let mut made = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => made += 1,
            Err(ControlError::Quota { code, .. }) => assert_eq!(code, "running_quota_exceeded"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(made, 5);
    assert_eq!(s.sandboxes.count_running("ws_a").await.unwrap(), 5);

    // Free two: one destroyed, one suspended (no slot). Waking the suspended one claims a
    // slot and counts; then one create fits, a second does not.
    let rows = s.sandboxes.list("ws_a", None).await.unwrap();
    s.sandboxes.mark_destroyed(&rows[0].id, 30).await.unwrap();
    s.sandboxes
        .mark_suspended(&rows[1].id, None, 30)
        .await
        .unwrap();
    let suspended = s.sandboxes.get(&rows[1].id).await.unwrap().unwrap();
    s.sandboxes
        .claim_slot_admitted(&suspended, 40, 5, 31)
        .await
        .unwrap();
    s.sandboxes
        .insert_admitted(&sandbox("sb_x", "ws_a", Status::Creating, Some(41)), 5)
        .await
        .unwrap();
    let e = s
        .sandboxes
        .insert_admitted(&sandbox("sb_y", "ws_a", Status::Creating, Some(42)), 5)
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::Quota { .. }), "{e}");
    assert!(
        s.sandboxes.get("sb_y").await.unwrap().is_none(),
        "nothing was made"
    );

    let mut pooled = sandbox("pool0", "ws_system", Status::Pooled, Some(50));
    pooled.created_at = 1;
    s.sandboxes.insert(&pooled).await.unwrap();
    let owner = sandbox("req", "ws_a", Status::Running, None);
    let e = s
        .sandboxes
        .take_pooled("tpl_base", &owner, 5)
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::Quota { .. }), "{e}");
    assert_eq!(
        s.sandboxes.pooled_count("n1", "tpl_base").await.unwrap(),
        1,
        "the pool is intact"
    );
    assert_eq!(
        s.sandboxes
            .take_pooled("tpl_base", &owner, 0)
            .await
            .unwrap()
            .as_deref(),
        Some("pool0"),
        "without a limit it is taken"
    );
    other.db().close().await;
}
both!(running_quota_holds_across_processes);

fn node(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        address: format!("http://{id}.internal:7879"),
        runsc_build: "release-20250101".into(),
        memory_mib: 16_384,
        slots: 200,
    }
}

/// Leases: registration fences the earlier epoch, heartbeats renew and report load, a
/// lapsed lease is declared lost once (even with two replicas expiring at the same time),
/// a lost node's heartbeat is refused until it registers again, drains survive a restart,
/// and the database's clock is the one leases are measured by.
async fn nodes_leases_epochs_and_loss(db: &TestDb) {
    let s = &db.store;
    let now = s.nodes.now().await.unwrap();
    let local = crate::util::now_ms();
    assert!(
        (now - local).abs() < 60_000,
        "the database clock ({now}) is far from this host's ({local})"
    );

    let bad = NodeInfo {
        id: "../a".into(),
        ..node("a")
    };
    assert!(matches!(
        s.nodes.register(&bad, now, 10_000).await,
        Err(ControlError::Invalid {
            code: "invalid_node_id",
            ..
        })
    ));
    for id in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
        assert!(!valid_node_id(id), "{id:?}");
    }
    assert!(s.nodes.list().await.unwrap().is_empty());

    let a1 = s.nodes.register(&node("a"), now, 10_000).await.unwrap();
    let b1 = s.nodes.register(&node("b"), now, 10_000).await.unwrap();
    assert_eq!((a1, b1), (1, 1));
    let load = NodeLoad {
        free_memory_mib: 8_000,
        free_slots: 150,
        templates: vec!["tpl_base".into()],
        images: vec!["sha256:aa".into()],
    };
    assert_eq!(
        s.nodes
            .heartbeat("a", a1, &load, now + 1, 10_000)
            .await
            .unwrap(),
        Heartbeat::Renewed(NodeStatus::Live)
    );
    let a = s.nodes.get("a").await.unwrap().unwrap();
    assert_eq!(a.load, load);
    assert_eq!(a.lease_until, now + 10_001);

    // A restart registers again: the old process's heartbeats are fenced.
    let a2 = s.nodes.register(&node("a"), now + 2, 10_000).await.unwrap();
    assert_eq!(a2, 2);
    assert_eq!(
        s.nodes
            .heartbeat("a", a1, &load, now + 3, 10_000)
            .await
            .unwrap(),
        Heartbeat::Fenced
    );
    assert_eq!(
        s.nodes.get("a").await.unwrap().unwrap().load.templates,
        Vec::<String>::new(),
        "a fenced heartbeat changed nothing"
    );

    // b stops heartbeating; at its lease's end two replicas expire at once: one declares it.
    let other = db.another_process().await;
    let at = now + 10_000;
    let (x, y) = tokio::join!(s.nodes.expire(at), other.nodes.expire(at));
    let (mut x, y) = (x.unwrap(), y.unwrap());
    x.extend(y);
    assert_eq!(x, vec!["b".to_string()], "declared exactly once");
    let alive: Vec<String> = s
        .nodes
        .alive(at)
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.info.id)
        .collect();
    assert_eq!(alive, vec!["a".to_string()]);
    assert_eq!(
        s.nodes
            .heartbeat("b", b1, &load, at + 1, 10_000)
            .await
            .unwrap(),
        Heartbeat::Fenced,
        "a lost node's lease is not renewed"
    );
    let b2 = s.nodes.register(&node("b"), at + 2, 10_000).await.unwrap();
    assert_eq!(
        s.nodes
            .heartbeat("b", b2, &load, at + 3, 10_000)
            .await
            .unwrap(),
        Heartbeat::Renewed(NodeStatus::Live)
    );

    // Drain: the node learns it from its heartbeat, a restart keeps it, undrain ends it.
    assert!(s.nodes.set_draining("a", true).await.unwrap());
    assert_eq!(
        s.nodes
            .heartbeat("a", a2, &load, now + 4, 10_000)
            .await
            .unwrap(),
        Heartbeat::Renewed(NodeStatus::Draining)
    );
    let a3 = s.nodes.register(&node("a"), now + 5, 10_000).await.unwrap();
    assert_eq!(
        s.nodes.get("a").await.unwrap().unwrap().status,
        NodeStatus::Draining
    );
    assert!(s.nodes.set_draining("a", false).await.unwrap());
    assert_eq!(
        s.nodes
            .heartbeat("a", a3, &load, now + 6, 10_000)
            .await
            .unwrap(),
        Heartbeat::Renewed(NodeStatus::Live)
    );
    assert!(!s.nodes.set_draining("nobody", true).await.unwrap());

    // Only a lost node can be forgotten.
    assert!(!s.nodes.forget("a").await.unwrap());
    s.nodes.expire(now + 1_000_000).await.unwrap();
    assert!(s.nodes.forget("a").await.unwrap());
    assert!(s.nodes.get("a").await.unwrap().is_none());

    // A row no version wrote fails closed.
    with_db!(s.db(), p => sqlx::query("UPDATE nodes SET images = 'nope' WHERE id = 'b'")
        .execute(p).await.map(|_| ()))
    .unwrap();
    assert!(matches!(
        s.nodes.get("b").await,
        Err(ControlError::Corrupt { .. })
    ));
    other.db().close().await;
}
both!(nodes_leases_epochs_and_loss);

/// Every sandbox belongs to one node: slots are unique per node (the same number on two
/// nodes is two slots), every node-side query sees only its own rows, and rows written
/// before owners existed are adopted by the first node that asks.
async fn sandboxes_belong_to_one_node(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    let on = |id: &str, node: &str, status: Status, slot: Option<i64>| Sandbox {
        node_id: node.into(),
        remote_image: None,
        ..sandbox(id, "ws_a", status, slot)
    };
    s.sandboxes
        .insert(&on("a1", "n1", Status::Running, Some(0)))
        .await
        .unwrap();
    s.sandboxes
        .insert(&on("b1", "n2", Status::Running, Some(0)))
        .await
        .unwrap();
    let e = s
        .sandboxes
        .insert(&on("a2", "n1", Status::Running, Some(0)))
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::Store { .. }), "{e}");
    s.sandboxes
        .insert(&on("a3", "n1", Status::Pooled, Some(1)))
        .await
        .unwrap();
    s.sandboxes
        .insert(&on("b3", "n2", Status::Pooled, Some(1)))
        .await
        .unwrap();

    assert_eq!(s.sandboxes.used_slots("n1").await.unwrap().len(), 2);
    let running: Vec<String> = s
        .sandboxes
        .running("n2")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(running, ["b1"]);
    assert_eq!(s.sandboxes.expired("n1", 2000).await.unwrap(), ["a1"]);
    assert_eq!(s.sandboxes.pooled_count("n1", "tpl_base").await.unwrap(), 1);
    let listed = s.sandboxes.with_status("n2", &Status::ALL).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|r| r.node_id == "n2"));
    // A pooled sandbox goes only to a create on its own node.
    let owner = Sandbox {
        node_id: "n2".into(),
        remote_image: None,
        ..sandbox("req", "ws_a", Status::Running, None)
    };
    assert_eq!(
        s.sandboxes
            .take_pooled("tpl_base", &owner, 0)
            .await
            .unwrap()
            .as_deref(),
        Some("b3")
    );
    assert_eq!(
        s.sandboxes
            .take_pooled("tpl_base", &owner, 0)
            .await
            .unwrap(),
        None,
        "n1's pooled sandbox is not n2's to hand out"
    );

    // A row no node owns (written by a version before owners) is adopted once.
    s.sandboxes
        .insert(&on("old", "", Status::Suspended, None))
        .await
        .unwrap();
    assert_eq!(s.sandboxes.adopt_unowned("n1").await.unwrap(), 1);
    assert_eq!(s.sandboxes.adopt_unowned("n2").await.unwrap(), 0);
    assert_eq!(s.sandboxes.get("old").await.unwrap().unwrap().node_id, "n1");
}
both!(sandboxes_belong_to_one_node);

/// A lost node's sandboxes are settled once it is declared lost: running ones fail (their
/// slots kept for the node to release), pooled ones go, suspended ones and other nodes'
/// stay; settling again changes nothing; the node, back, finds what to tear down.
async fn lost_nodes_sandboxes_are_settled(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    let now = s.nodes.now().await.unwrap();
    for n in ["n1", "n2"] {
        s.nodes.register(&node(n), now, 1_000).await.unwrap();
    }
    let on = |id: &str, node: &str, status: Status, slot: Option<i64>| Sandbox {
        node_id: node.into(),
        remote_image: None,
        ..sandbox(id, "ws_a", status, slot)
    };
    for row in [
        on("run1", "n1", Status::Running, Some(0)),
        on("new1", "n1", Status::Creating, Some(1)),
        on("pool1", "n1", Status::Pooled, Some(2)),
        on("susp1", "n1", Status::Suspended, None),
        on("run2", "n2", Status::Running, Some(0)),
    ] {
        s.sandboxes.insert(&row).await.unwrap();
    }
    // Nobody is lost yet: nothing to settle.
    assert!(
        s.sandboxes
            .settle_on_lost_nodes("lost", now)
            .await
            .unwrap()
            .is_empty()
    );
    s.nodes
        .heartbeat("n2", 1, &NodeLoad::default(), now, 60_000)
        .await
        .unwrap();
    assert_eq!(s.nodes.expire(now + 1_000).await.unwrap(), ["n1"]);
    assert_eq!(
        s.sandboxes.settle_on_lost_nodes("lost", now).await.unwrap(),
        ["new1", "pool1", "run1"]
    );
    assert!(
        s.sandboxes
            .settle_on_lost_nodes("lost", now)
            .await
            .unwrap()
            .is_empty()
    );
    let get = |id: &'static str| async move { s.sandboxes.get(id).await.unwrap().unwrap() };
    let run1 = get("run1").await;
    assert_eq!(
        (run1.status, run1.error.as_deref(), run1.slot),
        (Status::Failed, Some("lost"), Some(0))
    );
    assert_eq!(get("pool1").await.status, Status::Destroyed);
    assert_eq!(get("susp1").await.status, Status::Suspended);
    assert_eq!(get("run2").await.status, Status::Running);
    let mut back: Vec<String> = s
        .sandboxes
        .settled_holding_slots("n1")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    back.sort();
    assert_eq!(back, ["new1", "pool1", "run1"]);
    assert!(
        s.sandboxes
            .settled_holding_slots("n2")
            .await
            .unwrap()
            .is_empty()
    );
}
both!(lost_nodes_sandboxes_are_settled);

async fn volumes_mounts_and_references(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    let vol = |id: &str, name: &str| VolumeRow {
        id: id.into(),
        workspace_id: "ws_a".into(),
        name: name.into(),
        size_bytes: 64 << 20,
        node_id: "n1".into(),
        created_at: 1,
        remote_image: None,
    };
    assert!(s.volumes.insert(&vol("vol_1", "data"), 2).await.unwrap());
    let taken = s.volumes.insert(&vol("vol_x", "data"), 2).await;
    assert!(
        matches!(
            taken,
            Err(ControlError::Conflict {
                code: "volume_exists",
                ..
            })
        ),
        "{taken:?}"
    );
    assert!(s.volumes.insert(&vol("vol_2", "cache"), 2).await.unwrap());
    assert!(
        !s.volumes.insert(&vol("vol_3", "more"), 2).await.unwrap(),
        "the limit"
    );
    let names: Vec<String> = s
        .volumes
        .list("ws_a")
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["cache", "data"]);
    assert_eq!(
        s.volumes.get("ws_a", "data").await.unwrap().unwrap().id,
        "vol_1"
    );
    assert!(s.volumes.get("ws_b", "data").await.unwrap().is_none());
    assert_eq!(s.volumes.on_node("n1").await.unwrap().len(), 2);

    s.sandboxes
        .insert(&sandbox("sb_1", "ws_a", Status::Running, Some(1)))
        .await
        .unwrap();
    let rw = VolumeMountRow {
        volume_id: "vol_1".into(),
        path: "/data".into(),
        read_only: false,
    };
    s.volumes
        .add_mounts("sb_1", std::slice::from_ref(&rw))
        .await
        .unwrap();
    assert_eq!(
        s.volumes.mounts_of("sb_1").await.unwrap(),
        std::slice::from_ref(&rw)
    );
    assert_eq!(
        s.volumes.writer("vol_1", "sb_x").await.unwrap().as_deref(),
        Some("sb_1")
    );
    assert_eq!(
        s.volumes.writer("vol_1", "sb_1").await.unwrap(),
        None,
        "except itself"
    );
    assert!(s.volumes.user("vol_1").await.unwrap().is_some());
    assert!(s.volumes.user("vol_2").await.unwrap().is_none());

    s.volumes
        .add_snapshot_refs("sn_1", std::slice::from_ref(&rw))
        .await
        .unwrap();
    assert_eq!(s.volumes.snapshot_refs("sn_1").await.unwrap(), [rw]);
    s.volumes.forget_snapshot("sn_1").await.unwrap();
    assert!(s.volumes.snapshot_refs("sn_1").await.unwrap().is_empty());
    assert!(s.volumes.delete("vol_1").await.unwrap());
    assert!(s.volumes.mounts_of("sb_1").await.unwrap().is_empty());
    assert!(!s.volumes.delete("vol_1").await.unwrap());
}
both!(volumes_mounts_and_references);

both!(events_are_per_workspace_ordered_and_pruned);
async fn events_are_per_workspace_ordered_and_pruned(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    workspace(s, "ws_b").await;
    base_template(s).await;
    s.sandboxes
        .insert(&sandbox("sb_e", "ws_a", Status::Running, Some(1)))
        .await
        .unwrap();
    let detail = serde_json::json!({"reason": "requested"});
    s.events
        .append_for_sandbox("sb_e", "suspended", &detail, 1_000)
        .await
        .unwrap();
    // A sandbox with no row: nothing is appended, no error.
    s.events
        .append_for_sandbox("sb_none", "woken", &detail, 1_001)
        .await
        .unwrap();
    s.events
        .append(
            "ws_b",
            "build_finished",
            None,
            &serde_json::json!({}),
            2_000,
        )
        .await
        .unwrap();
    s.events
        .append(
            "ws_a",
            "destroyed",
            Some("sb_e"),
            &serde_json::json!({}),
            3_000,
        )
        .await
        .unwrap();
    let a = s.events.after("ws_a", 0, i64::MAX, 100).await.unwrap();
    assert_eq!(
        a.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["suspended", "destroyed"]
    );
    assert_eq!(a[0].workspace_id, "ws_a");
    assert_eq!(a[0].sandbox_id.as_deref(), Some("sb_e"));
    assert_eq!(a[0].detail, r#"{"reason":"requested"}"#);
    assert!(a[0].seq < a[1].seq);
    assert_eq!(s.events.last_seq("ws_a").await.unwrap(), a[1].seq);
    assert_eq!(s.events.last_seq("ws_none").await.unwrap(), 0);
    // After a seq; not newer than `until`; at most `limit`.
    let later = s
        .events
        .after("ws_a", a[0].seq, i64::MAX, 100)
        .await
        .unwrap();
    assert_eq!(later, a[1..].to_vec());
    assert_eq!(
        s.events.after("ws_a", 0, 2_999, 100).await.unwrap(),
        a[..1].to_vec()
    );
    assert_eq!(
        s.events.after("ws_a", 0, i64::MAX, 1).await.unwrap().len(),
        1
    );
    // Pruning takes what is older than the bound, in every workspace.
    assert_eq!(s.events.prune(2_500).await.unwrap(), 2);
    assert_eq!(
        s.events.after("ws_a", 0, i64::MAX, 100).await.unwrap(),
        a[1..].to_vec()
    );
    assert!(
        s.events
            .after("ws_b", 0, i64::MAX, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

fn webhook(id: &str, ws: &str, events: Option<&[&str]>) -> WebhookRow {
    WebhookRow {
        id: id.into(),
        workspace_id: ws.into(),
        url: format!("https://hooks.test/{id}"),
        events: events.map(encode_kinds),
        description: None,
        secret: format!("whsec_{id}"),
        created_at: 1,
    }
}

both!(webhooks_fan_out_claim_once_and_settle_under_their_lease);
async fn webhooks_fan_out_claim_once_and_settle_under_their_lease(db: &TestDb) {
    let s = &db.store;
    workspace(s, "ws_a").await;
    workspace(s, "ws_b").await;
    base_template(s).await;
    assert!(
        s.webhooks
            .insert(&webhook("wh_all", "ws_a", None), 2)
            .await
            .unwrap()
    );
    assert!(
        s.webhooks
            .insert(
                &webhook("wh_gone", "ws_a", Some(&["destroyed", "build_finished"])),
                2
            )
            .await
            .unwrap()
    );
    // The workspace's limit: nothing is inserted past it; other workspaces are not counted.
    assert!(
        !s.webhooks
            .insert(&webhook("wh_3", "ws_a", None), 2)
            .await
            .unwrap()
    );
    assert!(
        s.webhooks
            .insert(&webhook("wh_b", "ws_b", None), 2)
            .await
            .unwrap()
    );
    assert_eq!(
        s.webhooks
            .list("ws_a")
            .await
            .unwrap()
            .iter()
            .map(|w| w.id.as_str())
            .collect::<Vec<_>>(),
        ["wh_all", "wh_gone"]
    );
    assert_eq!(
        s.webhooks
            .get("ws_a", "wh_gone")
            .await
            .unwrap()
            .unwrap()
            .kinds(),
        Some(vec!["destroyed".to_string(), "build_finished".to_string()])
    );
    assert!(s.webhooks.get("ws_b", "wh_gone").await.unwrap().is_none());
    assert!(!format!("{:?}", webhook("wh_x", "ws_a", None)).contains("whsec_"));

    s.sandboxes
        .insert(&sandbox("sb_w", "ws_a", Status::Running, Some(1)))
        .await
        .unwrap();
    s.events
        .append_for_sandbox("sb_w", "created", &serde_json::json!({}), 1_000)
        .await
        .unwrap();
    s.events
        .append(
            "ws_a",
            "destroyed",
            Some("sb_w"),
            &serde_json::json!({}),
            1_001,
        )
        .await
        .unwrap();
    // `created` reaches wh_all only; `destroyed` both; ws_b's webhook nothing.
    assert_eq!(
        s.webhooks
            .deliveries("ws_a", "wh_all", 10)
            .await
            .unwrap()
            .len(),
        2
    );
    let gone = s.webhooks.deliveries("ws_a", "wh_gone", 10).await.unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].kind.as_deref(), Some("destroyed"));
    assert_eq!((gone[0].status.as_str(), gone[0].attempts), (PENDING, 0));
    assert!(
        s.webhooks
            .deliveries("ws_b", "wh_b", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.webhooks
            .deliveries("ws_b", "wh_all", 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Two processes claim at once: each delivery goes to exactly one of them.
    let other = db.another_process().await;
    let (x, y) = tokio::join!(
        s.webhooks.claim("node-x", 2_000, 100_000, 10),
        other.webhooks.claim("node-y", 2_000, 100_000, 10)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let mut ids: Vec<i64> = x.iter().chain(&y).map(|d| d.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((ids.len(), x.len() + y.len()), (3, 3), "{x:?} {y:?}");
    // Leased: nothing more to claim before the lease lapses.
    assert!(
        s.webhooks
            .claim("node-z", 2_001, 100_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let claimed: Vec<(&str, &ClaimedDelivery)> = x
        .iter()
        .map(|d| ("node-x", d))
        .chain(y.iter().map(|d| ("node-y", d)))
        .collect();
    let (node, d) = claimed
        .iter()
        .find(|(_, d)| d.webhook_id == "wh_gone")
        .copied()
        .unwrap();
    assert_eq!(d.secret, "whsec_wh_gone");
    assert_eq!(d.kind.as_deref(), Some("destroyed"));
    assert_eq!(d.at, Some(1_001));
    let retry = AttemptOutcome {
        status: PENDING,
        next_attempt_at: 5_000,
        status_code: Some(500),
        error: None,
        response: Some("oops".into()),
        attempted_at: 2_000,
    };
    // Only the lease holder records.
    assert!(
        !s.webhooks
            .settle(d.id, "node-z", d.lease_until, &retry)
            .await
            .unwrap()
    );
    assert!(
        s.webhooks
            .settle(d.id, node, d.lease_until, &retry)
            .await
            .unwrap()
    );
    assert!(
        !s.webhooks
            .settle(d.id, node, d.lease_until, &retry)
            .await
            .unwrap()
    );
    let after = &s.webhooks.deliveries("ws_a", "wh_gone", 10).await.unwrap()[0];
    assert_eq!(
        (
            after.status.as_str(),
            after.attempts,
            after.last_status_code,
            after.next_attempt_at
        ),
        (PENDING, 1, Some(500), 5_000)
    );
    assert_eq!(after.last_response.as_deref(), Some("oops"));
    // Not due before its time; due after, and then claimable again.
    assert!(
        s.webhooks
            .claim("node-z", 4_999, 200_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = s
        .webhooks
        .claim("node-z", 5_000, 200_000, 10)
        .await
        .unwrap();
    assert_eq!(again.iter().map(|d| d.id).collect::<Vec<_>>(), [d.id]);
    assert_eq!(again[0].attempts, 1);
    // A lapsed lease is claimable by another node; the first one's outcome is then refused.
    let stolen = s
        .webhooks
        .claim("node-w", 200_001, 300_000, 10)
        .await
        .unwrap();
    assert_eq!(stolen.len(), 3);
    let delivered = AttemptOutcome {
        status: DELIVERED,
        status_code: Some(204),
        response: None,
        ..retry.clone()
    };
    assert!(
        !s.webhooks
            .settle(d.id, "node-z", 200_000, &delivered)
            .await
            .unwrap()
    );
    for d in &stolen {
        assert!(
            s.webhooks
                .settle(d.id, "node-w", d.lease_until, &delivered)
                .await
                .unwrap()
        );
    }
    assert!(
        s.webhooks
            .claim("node-w", 400_000, 500_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.webhooks.release_leases("node-w").await.unwrap(), 0);
    assert!(
        s.webhooks
            .deliveries("ws_a", "wh_all", 10)
            .await
            .unwrap()
            .iter()
            .all(|d| d.status == DELIVERED)
    );

    // A deleted webhook takes its deliveries; later events make none for it.
    assert!(!s.webhooks.delete("ws_b", "wh_gone").await.unwrap());
    assert!(s.webhooks.delete("ws_a", "wh_gone").await.unwrap());
    assert!(
        s.webhooks
            .deliveries("ws_a", "wh_gone", 10)
            .await
            .unwrap()
            .is_empty()
    );
    s.events
        .append("ws_a", "destroyed", None, &serde_json::json!({}), 1_002)
        .await
        .unwrap();
    let pending = s
        .webhooks
        .claim("node-w", 600_000, 700_000, 10)
        .await
        .unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|d| d.webhook_id.as_str())
            .collect::<Vec<_>>(),
        ["wh_all"]
    );
    // A restarted node gives up its leases: claimable at once by anyone.
    assert!(
        s.webhooks
            .claim("node-v", 600_001, 700_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.webhooks.release_leases("node-w").await.unwrap(), 1);
    assert_eq!(
        s.webhooks
            .claim("node-v", 600_001, 700_000, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // Deliveries go with their events' age.
    assert_eq!(s.webhooks.prune(1_002).await.unwrap(), 2);
    assert_eq!(
        s.webhooks
            .deliveries("ws_a", "wh_all", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    other.db().close().await;
}

both!(secrets_and_key_rotation);
async fn secrets_and_key_rotation(db: &TestDb) {
    use crate::secrets::{MasterKey, rotate_key};
    let s = &db.store;
    let old = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
    let new = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
    let row = |ws: &str, name: &str, value: &str| SecretRow {
        workspace_id: ws.into(),
        name: name.into(),
        sealed: old.seal(ws, name, value).unwrap(),
        hosts: r#"["api.example.com"]"#.into(),
        inject: r#"{"query":"key"}"#.into(),
        created_at: 1,
        updated_at: 1,
    };
    s.secrets.insert(&row("w1", "a", "va")).await.unwrap();
    s.secrets.insert(&row("w2", "a", "vb")).await.unwrap();
    match s.secrets.insert(&row("w1", "a", "other")).await {
        Err(ControlError::Conflict { code, .. }) => assert_eq!(code, "secret_exists"),
        other => panic!("{other:?}"),
    }
    // Scoped by workspace.
    assert_eq!(s.secrets.list("w1").await.unwrap().len(), 1);
    assert!(s.secrets.get("w3", "a").await.unwrap().is_none());

    // What a sandbox holds, copied as is (a fork).
    let held = SandboxSecrets {
        workspace_id: "w1".into(),
        lineage: "0".repeat(32),
        placeholders: [("a".to_string(), "ph".to_string())].into(),
    };
    s.secrets.bind("sb1", &held).await.unwrap();
    assert_eq!(s.secrets.held("sb1").await.unwrap(), Some(held.clone()));
    assert_eq!(s.secrets.held("sb2").await.unwrap(), None);

    // A rotation with the wrong old key writes nothing.
    let before = s.secrets.all().await.unwrap();
    assert!(rotate_key(s, &new, &old).await.is_err());
    let after = s.secrets.all().await.unwrap();
    assert_eq!(
        before.iter().map(|r| &r.sealed).collect::<Vec<_>>(),
        after.iter().map(|r| &r.sealed).collect::<Vec<_>>()
    );
    // The right one re-seals every value: they open with the new key only.
    assert_eq!(rotate_key(s, &old, &new).await.unwrap().values, 2);
    let w1 = s.secrets.get("w1", "a").await.unwrap().unwrap();
    assert_eq!(new.open("w1", "a", &w1.sealed).unwrap(), "va");
    assert!(old.open("w1", "a", &w1.sealed).is_err());
    let w2 = s.secrets.get("w2", "a").await.unwrap().unwrap();
    assert_eq!(new.open("w2", "a", &w2.sealed).unwrap(), "vb");

    assert!(s.secrets.delete("w1", "a").await.unwrap());
    assert!(!s.secrets.delete("w1", "a").await.unwrap());
    assert!(s.secrets.get("w2", "a").await.unwrap().is_some());
}

/// A node's secrets state with `key` (the proxy's upstream roots do not matter here).
fn secrets_state(key: &crate::secrets::MasterKey) -> crate::secrets::SecretsState {
    crate::secrets::SecretsState::new(crate::secrets::SecretsConfig {
        key: key.clone(),
        upstream: crate::secrets::upstream_config(&[]).unwrap(),
    })
}

/// What a node that predates the store's CAs left on its disk for `lineage`.
#[expect(
    clippy::disallowed_methods,
    reason = "the test's own temporary data dirs, by path"
)]
fn old_disk_ca(data_dir: &std::path::Path, lineage: &str) -> String {
    let (cert, key) = sandpit_net::secrets::LineageCa::generate().unwrap();
    let dir = data_dir.join("secrets-ca").join(lineage);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.crt"), &cert).unwrap();
    std::fs::write(dir.join("ca.key"), &key).unwrap();
    cert
}

both!(lineage_cas_belong_to_the_fleet);
#[expect(
    clippy::disallowed_methods,
    reason = "the test's own temporary data dirs, by path"
)]
async fn lineage_cas_belong_to_the_fleet(db: &TestDb) {
    use crate::secrets::{MasterKey, lineage_ca, rotate_key};
    let s = &db.store;
    let key = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
    let lineage = "a".repeat(32);
    // Two nodes (their own pools, data dirs and memory) need the same new lineage at once:
    // both get the one CA that went into the store.
    let other = db.another_process().await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (n1, n2) = (secrets_state(&key), secrets_state(&key));
    let (a, b) = tokio::join!(
        lineage_ca(s, d1.path(), &n1, "w1", &lineage),
        lineage_ca(&other, d2.path(), &n2, "w1", &lineage)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.cert_pem(), b.cert_pem());
    let row = s.secrets.lineage(&lineage).await.unwrap().unwrap();
    assert_eq!(
        (row.workspace_id.as_str(), row.cert_pem.as_str()),
        ("w1", a.cert_pem())
    );
    assert!(!row.key_sealed.contains("PRIVATE KEY"), "the key is sealed");
    // Nothing of a node's disk: the CA is the store's.
    assert!(!d1.path().join("secrets-ca").exists());
    // A third node, later, reads it (and its cache serves it again).
    let n3 = secrets_state(&key);
    let d3 = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let c = lineage_ca(s, d3.path(), &n3, "w1", &lineage).await.unwrap();
        assert_eq!(c.cert_pem(), a.cert_pem());
    }

    // Another workspace never gets it: not from a node's memory, not from the store.
    let corrupt = |r: Result<_, ControlError>| match r {
        Err(ControlError::Corrupt { what, detail }) => format!("{what}: {detail}"),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("loaded"),
    };
    let e = corrupt(lineage_ca(s, d1.path(), &n1, "w2", &lineage).await);
    assert!(e.contains("another workspace"), "{e}");
    let e = corrupt(lineage_ca(s, d1.path(), &secrets_state(&key), "w2", &lineage).await);
    assert!(e.contains("another workspace"), "{e}");
    assert!(
        lineage_ca(s, d1.path(), &n1, "w1", "../../etc")
            .await
            .is_err()
    );

    // A node with another key fails closed, saying why.
    let wrong = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
    let e = corrupt(lineage_ca(s, d1.path(), &secrets_state(&wrong), "w1", &lineage).await);
    assert!(e.contains("does not open with this secrets key"), "{e}");
    // A sealed key moved to another lineage does not open there.
    let moved = LineageRow {
        lineage: "b".repeat(32),
        ..row.clone()
    };
    assert!(s.secrets.insert_lineage(&moved).await.unwrap());
    assert!(
        !s.secrets.insert_lineage(&moved).await.unwrap(),
        "insert-if-absent"
    );
    let e = corrupt(lineage_ca(s, d1.path(), &secrets_state(&key), "w1", &moved.lineage).await);
    assert!(e.contains("does not open"), "{e}");

    // A CA an earlier version kept on a node's disk is imported (a sandbox made before the
    // upgrade keeps trusting it), and its directory goes.
    let old_lineage = "c".repeat(32);
    let old_cert = old_disk_ca(d2.path(), &old_lineage);
    let c = lineage_ca(&other, d2.path(), &n2, "w1", &old_lineage)
        .await
        .unwrap();
    assert_eq!(c.cert_pem(), old_cert);
    assert!(!d2.path().join("secrets-ca").join(&old_lineage).exists());
    let c = lineage_ca(s, d1.path(), &secrets_state(&key), "w1", &old_lineage)
        .await
        .unwrap();
    assert_eq!(c.cert_pem(), old_cert, "another node gets the imported CA");

    // Rotating the master key re-seals the CA keys with the values, in one go.
    let sealed = |v: &str| key.seal("w1", "a", v).unwrap();
    s.secrets
        .insert(&SecretRow {
            workspace_id: "w1".into(),
            name: "a".into(),
            sealed: sealed("va"),
            hosts: r#"["api.example.com"]"#.into(),
            inject: r#"{"query":"key"}"#.into(),
            created_at: 1,
            updated_at: 1,
        })
        .await
        .unwrap();
    let new = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
    // A CA key that does not open (the moved one) stops a rotation: nothing is written.
    match rotate_key(s, &key, &new).await {
        Err(ControlError::Invalid { code, message }) => {
            assert_eq!(code, "wrong_secrets_key");
            assert!(message.contains(&moved.lineage), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        key.open(
            "w1",
            "a",
            &s.secrets.get("w1", "a").await.unwrap().unwrap().sealed
        )
        .unwrap(),
        "va"
    );
    // Held lineages stay; the moved one, which nothing holds, goes.
    workspace(s, "w1").await;
    base_template(s).await;
    for (sb, l) in [("sb_1", &lineage), ("sb_2", &old_lineage)] {
        s.sandboxes
            .insert(&sandbox(sb, "w1", Status::Running, None))
            .await
            .unwrap();
        let held = SandboxSecrets {
            workspace_id: "w1".into(),
            lineage: l.clone(),
            placeholders: BTreeMap::new(),
        };
        s.secrets.bind(sb, &held).await.unwrap();
    }
    assert_eq!(
        s.secrets.collect_lineages(i64::MAX, 10).await.unwrap(),
        vec![moved.lineage.clone()]
    );
    let before = s.secrets.all_lineages().await.unwrap();
    // The wrong old key: refused, nothing written.
    match rotate_key(s, &wrong, &new).await {
        Err(ControlError::Invalid { code, message }) => {
            assert_eq!(code, "wrong_secrets_key");
            assert!(message.contains("nothing was written"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.secrets.all_lineages().await.unwrap(), before);
    let done = rotate_key(s, &key, &new).await.unwrap();
    assert_eq!((done.values, done.lineage_keys), (1, 2));
    for l in [&lineage, &old_lineage] {
        let fresh = tempfile::tempdir().unwrap();
        let c = lineage_ca(s, fresh.path(), &secrets_state(&new), "w1", l)
            .await
            .unwrap();
        assert_eq!(
            c.cert_pem(),
            s.secrets.lineage(l).await.unwrap().unwrap().cert_pem,
            "the same CA, opened with the new key"
        );
        let e = corrupt(lineage_ca(s, fresh.path(), &secrets_state(&key), "w1", l).await);
        assert!(
            e.contains("does not open"),
            "the old key no longer opens it: {e}"
        );
    }
    let v = s.secrets.get("w1", "a").await.unwrap().unwrap();
    assert_eq!(new.open("w1", "a", &v.sealed).unwrap(), "va");
    assert!(key.open("w1", "a", &v.sealed).is_err());
    // The old key cannot rotate again.
    assert!(rotate_key(s, &key, &new).await.is_err());
    other.db().close().await;
}

both!(lineage_cas_are_collected);
#[expect(
    clippy::disallowed_methods,
    reason = "the test's own temporary data dirs, by path"
)]
async fn lineage_cas_are_collected(db: &TestDb) {
    use crate::secrets::{LineageSweep, MasterKey, lineage_ca, sweep_lineages};
    let s = &db.store;
    workspace(s, "ws_a").await;
    base_template(s).await;
    let key = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
    let state = secrets_state(&key);
    let dir = tempfile::tempdir().unwrap();
    let l = |c: char| c.to_string().repeat(32);
    // running: held by a running sandbox; destroyed: only by a destroyed one; snapped: by
    // a destroyed one a snapshot was taken of; forked: by a destroyed parent and a live child.
    for (sb, status, lineage) in [
        ("sb_run", Status::Running, l('1')),
        ("sb_gone", Status::Destroyed, l('2')),
        ("sb_snap", Status::Destroyed, l('3')),
        ("sb_parent", Status::Destroyed, l('4')),
        ("sb_child", Status::Suspended, l('4')),
        ("sb_failed", Status::Failed, l('5')),
    ] {
        s.sandboxes
            .insert(&sandbox(sb, "ws_a", status, None))
            .await
            .unwrap();
        let held = SandboxSecrets {
            workspace_id: "ws_a".into(),
            lineage: lineage.clone(),
            placeholders: BTreeMap::new(),
        };
        s.secrets.bind(sb, &held).await.unwrap();
        lineage_ca(s, dir.path(), &state, "ws_a", &lineage)
            .await
            .unwrap();
    }
    assert!(
        s.snapshots
            .insert(
                &SnapshotRow {
                    id: "sn_1".into(),
                    workspace_id: "ws_a".into(),
                    sandbox_id: "sb_snap".into(),
                    template_id: "tpl_base".into(),
                    template_name: "base".into(),
                    size: "small".into(),
                    env: "{}".into(),
                    egress: "{}".into(),
                    has_memory: false,
                    size_bytes: 1,
                    created_at: 1,
                    remote_image: None,
                },
                10,
            )
            .await
            .unwrap()
    );
    // Old CAs on this node's disk: one a live sandbox holds, one nothing holds.
    let held_old = l('6');
    s.sandboxes
        .insert(&sandbox("sb_old", "ws_a", Status::Suspended, None))
        .await
        .unwrap();
    s.secrets
        .bind(
            "sb_old",
            &SandboxSecrets {
                workspace_id: "ws_a".into(),
                lineage: held_old.clone(),
                placeholders: BTreeMap::new(),
            },
        )
        .await
        .unwrap();
    let held_cert = old_disk_ca(dir.path(), &held_old);
    old_disk_ca(dir.path(), &l('7'));

    // Within the grace period nothing is collected.
    let done = sweep_lineages(s, dir.path(), Some(&state), 0)
        .await
        .unwrap();
    assert_eq!(
        done,
        LineageSweep {
            collected: vec![],
            imported: 1,
            removed: 1
        }
    );
    assert!(!dir.path().join("secrets-ca").join(&held_old).exists());
    assert!(!dir.path().join("secrets-ca").join(l('7')).exists());
    assert_eq!(
        s.secrets
            .lineage(&held_old)
            .await
            .unwrap()
            .unwrap()
            .cert_pem,
        held_cert
    );
    let later = crate::util::now_ms() + 1;
    let done = sweep_lineages(s, dir.path(), Some(&state), later)
        .await
        .unwrap();
    assert_eq!(done.collected, vec![l('2')], "only the destroyed sandbox's");
    assert!(s.secrets.lineage(&l('2')).await.unwrap().is_none());
    for kept in ['1', '3', '4', '5', '6'] {
        assert!(
            s.secrets.lineage(&l(kept)).await.unwrap().is_some(),
            "{kept}"
        );
    }
    // The snapshot goes, then the child: their lineages follow.
    assert!(s.snapshots.delete("ws_a", "sn_1").await.unwrap());
    s.sandboxes.mark_destroyed("sb_child", later).await.unwrap();
    let mut done = sweep_lineages(s, dir.path(), None, later).await.unwrap();
    done.collected.sort();
    assert_eq!(done.collected, vec![l('3'), l('4')]);
    // A collected lineage is made anew if something needs it again (a new CA), and the
    // grace period counts from then.
    lineage_ca(s, dir.path(), &state, "ws_a", &l('2'))
        .await
        .unwrap();
    let made = s
        .secrets
        .lineage(&l('2'))
        .await
        .unwrap()
        .unwrap()
        .created_at;
    let d = dir.path();
    let sweep =
        |before: i64| async move { sweep_lineages(s, d, None, before).await.unwrap().collected };
    assert!(sweep(made).await.is_empty());
    assert_eq!(sweep(made + 1).await, vec![l('2')]);
}
