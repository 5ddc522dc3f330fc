//! The template catalog's rules over a real store: names and aliases (hostile ones too),
//! the two quotas, and deletion (in use, forced, building, built-in, another workspace's).

use std::sync::Arc;

use sandpit_api_types::SandboxMode;
use sandpit_net::fake::FakeNetwork;

use super::Harness;
use crate::ControlError;
use crate::domain::Status;
use crate::node::catalog;
use crate::node::images::BASE_TEMPLATE_ID;
use crate::store::{TemplateRow, TemplateStatus};
use crate::testing::runtime_with_agents;

/// A template of `h`'s workspace named `name`, on the base template's files (so sandboxes
/// boot from it), in `status`.
async fn template(h: &Harness, name: &str, status: TemplateStatus) -> TemplateRow {
    let base = h
        .node
        .store
        .templates
        .by_id(BASE_TEMPLATE_ID)
        .await
        .unwrap()
        .unwrap();
    TemplateRow {
        id: format!("tpl_{name}"),
        name: name.into(),
        workspace_id: Some(h.workspace.clone()),
        source: "dockerfile".into(),
        status,
        ..base
    }
}

async fn quota_harness(max_templates: u32, max_builds: u32) -> Harness {
    Harness::configured(
        Arc::new(runtime_with_agents()),
        Arc::new(FakeNetwork::new(4)),
        |cfg| {
            cfg.quotas.max_templates = max_templates;
            cfg.quotas.max_builds = max_builds;
        },
    )
    .await
}

#[test]
fn names_and_aliases_refuse_what_could_name_a_path_or_confuse_a_lookup() {
    for good in ["a", "web-app", "v1.2_x", "0", &"x".repeat(64)] {
        catalog::check_name(good).unwrap();
    }
    for bad in [
        "",
        "Web",
        "-a",
        ".a",
        "..",
        "a/b",
        "../etc",
        "a b",
        "a@b",
        "é",
        "a\0",
        &"x".repeat(65),
    ] {
        match catalog::check_name(bad) {
            Err(ControlError::Invalid { code, .. }) => assert_eq!(code, "invalid_name", "{bad:?}"),
            other => panic!("{bad:?} was {other:?}"),
        }
    }
    assert_eq!(catalog::parse_alias("team@web").unwrap(), ("team", "web"));
    for bad in [
        "team",
        "@web",
        "team@",
        "team@web@x",
        "Team@web",
        "team@../x",
        "a/b@c",
    ] {
        assert!(
            matches!(
                catalog::parse_alias(bad),
                Err(ControlError::Invalid {
                    code: "invalid_alias",
                    ..
                })
            ),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn register_refuses_a_taken_name_and_both_quotas_and_records_nothing() {
    let h = quota_harness(2, 1).await;
    let first = template(&h, "one", TemplateStatus::Building).await;
    catalog::register(&h.node, &first).await.unwrap();

    // One build under way is the limit: a second is refused while it runs...
    let two = template(&h, "two", TemplateStatus::Building).await;
    assert!(matches!(
        catalog::check_quotas(&h.node, &h.workspace).await,
        Err(ControlError::Underway {
            limit: "max_builds",
            ..
        })
    ));
    assert!(matches!(
        catalog::register(&h.node, &two).await,
        Err(ControlError::Underway {
            limit: "max_builds",
            ..
        })
    ));
    // ...and taken once it ended.
    h.node
        .store
        .templates
        .finish_build(&first.id, TemplateStatus::Ready, "[]", "{}", None, 1)
        .await
        .unwrap();
    catalog::register(&h.node, &two).await.unwrap();
    h.node
        .store
        .templates
        .finish_build(&two.id, TemplateStatus::Failed, "[]", "{}", Some("x"), 1)
        .await
        .unwrap();

    // Two kept is the other limit; a failed build counts, a deleted one does not.
    let three = template(&h, "three", TemplateStatus::Building).await;
    assert!(matches!(
        catalog::register(&h.node, &three).await,
        Err(ControlError::Kept {
            limit: "max_templates",
            ..
        })
    ));
    catalog::delete(&h.node, &h.workspace, "two", false)
        .await
        .unwrap();
    catalog::register(&h.node, &three).await.unwrap();
}

#[tokio::test]
async fn delete_refuses_a_template_in_use_unless_forced_which_destroys_its_sandboxes() {
    let h = Harness::new().await;
    let t = template(&h, "web", TemplateStatus::Ready).await;
    catalog::register(&h.node, &t).await.unwrap();
    let sb = h.create_from("web", SandboxMode::Ephemeral).await.unwrap();

    match catalog::delete(&h.node, &h.workspace, "web", false).await {
        Err(ControlError::Conflict { code, message }) => {
            assert_eq!(code, "template_in_use");
            assert!(message.contains(sb.id.as_str()), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.row(&sb.id).await.status, Status::Running);
    assert_eq!(
        h.rt.held(),
        vec![format!("t-{}", sb.id)],
        "the refusal touched the sandbox"
    );

    catalog::delete(&h.node, &h.workspace, &t.id, true)
        .await
        .unwrap();
    assert_eq!(h.row(&sb.id).await.status, Status::Destroyed);
    assert!(h.rt.held().is_empty(), "{:?}", h.rt.held());
    assert!(matches!(
        catalog::find(&h.node, &h.workspace, "web").await,
        Err(ControlError::NotFound {
            code: "template_not_found",
            ..
        })
    ));
    // The name builds again, as its next version (numbers are never reused).
    let again = TemplateRow {
        id: "tpl_web2".into(),
        ..t
    };
    assert_eq!(catalog::register(&h.node, &again).await.unwrap(), 2);
}

#[tokio::test]
async fn delete_refuses_builds_under_way_built_ins_and_other_workspaces_templates() {
    let h = Harness::new().await;
    let building = template(&h, "wip", TemplateStatus::Building).await;
    catalog::register(&h.node, &building).await.unwrap();
    assert!(matches!(
        catalog::delete(&h.node, &h.workspace, "wip", true).await,
        Err(ControlError::Conflict {
            code: "template_building",
            ..
        })
    ));
    assert!(matches!(
        catalog::delete(&h.node, &h.workspace, "base", true).await,
        Err(ControlError::Forbidden {
            code: "template_builtin",
            ..
        })
    ));
    assert!(
        h.node
            .store
            .templates
            .by_id(BASE_TEMPLATE_ID)
            .await
            .unwrap()
            .is_some()
    );
    // Another workspace neither sees nor deletes it, by name or by id.
    for key in ["wip", building.id.as_str()] {
        assert!(matches!(
            catalog::delete(&h.node, "ws_other", key, true).await,
            Err(ControlError::NotFound { .. })
        ));
    }
    assert_eq!(
        h.node
            .store
            .templates
            .by_id(&building.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        TemplateStatus::Building
    );
}

#[tokio::test]
async fn deleting_a_version_spares_the_others_and_deleting_the_name_takes_all_of_them() {
    let h = Harness::new().await;
    let mut ids = Vec::new();
    for n in 1..=3u32 {
        let t = TemplateRow {
            id: format!("tpl_web{n}"),
            ..template(&h, "web", TemplateStatus::Building).await
        };
        assert_eq!(catalog::register(&h.node, &t).await.unwrap(), n);
        h.node
            .store
            .templates
            .finish_build(&t.id, TemplateStatus::Ready, "[]", "{}", None, 1)
            .await
            .unwrap();
        ids.push(t.id);
    }
    // A sandbox of version 1 keeps it: deleting `web:1` is refused, `web:3` is not, and
    // the name falls back to version 2.
    let sb = h
        .create_from("web:1", SandboxMode::Ephemeral)
        .await
        .unwrap();
    assert_eq!(h.row(&sb.id).await.template_id, "tpl_web1");
    assert!(matches!(
        catalog::delete(&h.node, &h.workspace, "web:1", false).await,
        Err(ControlError::Conflict {
            code: "template_in_use",
            ..
        })
    ));
    catalog::delete(&h.node, &h.workspace, "web:3", false)
        .await
        .unwrap();
    assert_eq!(
        catalog::find(&h.node, &h.workspace, "web")
            .await
            .unwrap()
            .version,
        2
    );
    // The name: every version, refused while any is used, forced destroys the users.
    assert!(matches!(
        catalog::delete(&h.node, &h.workspace, "web", false).await,
        Err(ControlError::Conflict {
            code: "template_in_use",
            ..
        })
    ));
    assert_eq!(
        catalog::find(&h.node, &h.workspace, "web")
            .await
            .unwrap()
            .version,
        2
    );
    catalog::delete(&h.node, &h.workspace, "web", true)
        .await
        .unwrap();
    assert_eq!(h.row(&sb.id).await.status, Status::Destroyed);
    assert!(
        h.node
            .store
            .templates
            .versions(&h.workspace, "web")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        catalog::delete(&h.node, &h.workspace, "web:x", false).await,
        Err(ControlError::Invalid {
            code: "invalid_template_version",
            ..
        })
    ));
}
