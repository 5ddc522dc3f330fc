//! Templates from OCI images and Dockerfiles, end to end: a local `docker-registry` on
//! 127.0.0.1 holding an image made offline from the host's busybox, builds through the CLI
//! (progress, streamed logs, exit codes), the layer cache, sandboxes that run the
//! template's start command, aliases and deletion. Pulls from loopback work only for
//! registries the server lists in `--allowed-registries`.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use futures::StreamExt;
use sandpit_sdk::Client;
use sandpit_sdk::types::{
    CreateSandboxRequest, CreateTemplateRequest, RegistryAuth, TemplateBuildEvent,
};
use sandpit_test_support::registry::{Registry, busybox_rootfs_tar, file};
use sandpit_test_support::{TestServer, wait_until};

use crate::{assert_api_err, create, sh};

fn cli(srv: &TestServer, args: &[&str]) -> Output {
    std::process::Command::new(crate::bin())
        .args(args)
        .env("SANDPIT_URL", &srv.url)
        .env("SANDPIT_TOKEN", &srv.token)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn from(template: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        template: template.into(),
        timeout: Some("10m".into()),
        ..Default::default()
    }
}

/// A server whose pulls may reach these loopback registries (`host:port`).
async fn server_allowing(registries: &[&str]) -> TestServer {
    TestServer::start_with(
        crate::bin(),
        &[("SANDPIT_ALLOWED_REGISTRIES", &registries.join(","))],
    )
    .await
    .expect("server starts")
}

/// Wait for a build started through the API; returns its events.
pub(crate) async fn follow(client: &Client, id: &str) -> Vec<TemplateBuildEvent> {
    let stream = client
        .template_build_events(id)
        .await
        .expect("build events");
    let events: Vec<_> = tokio::time::timeout(Duration::from_secs(300), stream.collect::<Vec<_>>())
        .await
        .expect("the build ends");
    events
        .into_iter()
        .map(|e| e.expect("event decodes"))
        .collect()
}

fn write(dir: &Path, rel: &str, body: &[u8]) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, body).unwrap();
}

/// An image with two layers (the second deletes a file and makes a directory opaque) in a
/// registry that wants basic auth; a template from it; a Dockerfile built FROM it through
/// the CLI whose start command serves HTTP; a rebuild after changing the last step that
/// re-runs only that step; aliases; delete refused while a sandbox uses the template.
#[tokio::test]
async fn registry_image_and_dockerfile_templates() {
    let registry = Registry::start(Some(("builder", "s3cret")))
        .await
        .expect("registry starts");
    let base = busybox_rootfs_tar(|t| {
        file(t, "etc/removed", b"old\n", 0o644).unwrap();
        file(t, "opq/old", b"old\n", 0o644).unwrap();
        file(t, "etc/kept", b"kept\n", 0o600).unwrap();
    })
    .unwrap();
    let mut top = tar::Builder::new(Vec::new());
    file(&mut top, "etc/.wh.removed", b"", 0o644).unwrap();
    file(&mut top, "opq/.wh..wh..opq", b"", 0o644).unwrap();
    file(&mut top, "opq/new", b"new\n", 0o644).unwrap();
    let top = top.into_inner().unwrap();
    let image = registry
        .push(
            "sandpit/busybox",
            "1",
            &[base, top],
            serde_json::json!({"Env": ["PATH=/bin", "GREETING=from-image"], "Cmd": ["/bin/sh"]}),
        )
        .await
        .expect("push");

    let srv = server_allowing(&[&registry.host]).await;
    let client = srv.client();

    // Pull without credentials: the build fails with the registry's answer.
    let t = client
        .create_template(&CreateTemplateRequest {
            name: "noauth".into(),
            image: Some(image.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let events = follow(&client, &t.id).await;
    match events.last() {
        Some(TemplateBuildEvent::Finished { status, error, .. }) => {
            assert_eq!(status, "failed");
            let e = error.as_deref().unwrap_or_default();
            assert!(
                e.to_lowercase().contains("not authorized") || e.contains("401"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.get_template("noauth").await.unwrap().status,
        "failed"
    );

    // With basic auth: ready; a sandbox sees the union with whiteouts applied.
    let t = client
        .create_template(&CreateTemplateRequest {
            name: "img".into(),
            image: Some(image.clone()),
            registry_auth: Some(RegistryAuth {
                username: Some("builder".into()),
                password: Some("s3cret".into()),
                token: None,
            }),
            aliases: vec!["team@img".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(t.status, "building");
    let events = follow(&client, &t.id).await;
    assert!(
        matches!(events.last(), Some(TemplateBuildEvent::Finished { status, .. }) if status == "ready"),
        "{events:?}"
    );
    let t = client.get_template("team@img").await.unwrap();
    assert_eq!((t.status.as_str(), t.layers), ("ready", 2));
    assert_eq!(t.start_command, Some(vec!["/bin/sh".to_string()]));
    let sb = create(&client, from("img")).await;
    let out = sh(&client, &sb.id, "cat /etc/kept; ls /opq; test -e /etc/removed || echo removed-is-gone; echo $GREETING; stat -c %a /etc/kept").await;
    assert_eq!(
        out.stdout, "kept\nnew\nremoved-is-gone\nfrom-image\n600\n",
        "{out:?}"
    );
    client.destroy_sandbox(&sb.id).await.unwrap();

    // A Dockerfile FROM the registry image, built with the CLI.
    let ctx = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM {image}\nARG WHO=world\nENV GREETING=hello-$WHO\nRUN echo \"step output for $GREETING\" && mkdir -p /www && echo from-run > /www/run.txt\nCOPY site/ /www/\nWORKDIR /www\nEXPOSE 8080\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nRUN echo last-step-one > /www/last.txt\n"
    );
    write(ctx.path(), "Dockerfile", dockerfile.as_bytes());
    write(
        ctx.path(),
        "site/index.html",
        b"<h1>from the context</h1>\n",
    );
    write(ctx.path(), "site/secret.key", b"never copied\n");
    write(ctx.path(), ".dockerignore", b"**/*.key\n");
    let dir = ctx.path().to_str().unwrap();
    let auth_env = [
        ("SANDPIT_REGISTRY_USER", "builder"),
        ("SANDPIT_REGISTRY_PASSWORD", "s3cret"),
    ];
    let build = |name: &str| {
        let mut c = std::process::Command::new(crate::bin());
        c.args([
            "template",
            "build",
            dir,
            "--name",
            name,
            "--build-arg",
            "WHO=tests",
            "--alias",
            "team@web",
        ])
        .env("SANDPIT_URL", &srv.url)
        .env("SANDPIT_TOKEN", &srv.token);
        for (k, v) in auth_env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let started = std::time::Instant::now();
    let out = build("web");
    let cold = started.elapsed();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("Step 4/9: RUN echo"), "{log}");
    assert!(
        log.contains("step output for hello-tests"),
        "RUN output is streamed: {log}"
    );
    // Only FROM is a hit: its layers were pulled for `img` and are shared.
    assert_eq!(
        log.matches("-> cached").count(),
        1,
        "a cold build has no cache hits past FROM: {log}"
    );
    let sb = create(&client, from("team@web")).await;
    // The start command runs (EXPOSE 8080 is the ready check) and exec answers.
    let out = sh(&client, &sb.id, "wget -qO- http://127.0.0.1:8080/index.html; cat /www/run.txt /www/last.txt; test -e /www/secret.key || echo no-key; echo $GREETING; pwd").await;
    assert_eq!(
        out.stdout,
        "<h1>from the context</h1>\nfrom-run\nlast-step-one\nno-key\nhello-tests\n/www\n",
        "{out:?}"
    );

    // Change the last step: only it runs again.
    write(
        ctx.path(),
        "Dockerfile",
        dockerfile
            .replace("last-step-one", "last-step-two")
            .as_bytes(),
    );
    let started = std::time::Instant::now();
    let out = build("web2");
    let cached_time = started.elapsed();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        log.matches("-> cached").count(),
        8,
        "every step but the last is cached: {log}"
    );
    assert!(
        !log.contains("step output for hello-tests"),
        "the first RUN did not run again: {log}"
    );
    eprintln!("cold build {cold:?}, rebuild after changing the last step {cached_time:?}");
    let web2 = client.get_template("web2").await.unwrap();
    assert_eq!(
        web2.aliases,
        vec!["team@web".to_string()],
        "the alias moved to the newest build"
    );
    let sb2 = create(&client, from("team@web")).await;
    assert_eq!(
        sh(&client, &sb2.id, "cat /www/last.txt").await.stdout,
        "last-step-two\n"
    );
    client.destroy_sandbox(&sb2.id).await.unwrap();

    // Delete: refused while a sandbox uses it, forced destroys the sandbox.
    assert_api_err(
        client.delete_template("web", false).await,
        409,
        "template_in_use",
    );
    assert_api_err(
        client.delete_template("base", false).await,
        403,
        "template_builtin",
    );
    client.delete_template("web", true).await.unwrap();
    assert_api_err(client.get_template("web").await, 404, "template_not_found");
    wait_until(
        Duration::from_secs(30),
        "the sandbox to be destroyed",
        || {
            let (client, id) = (client.clone(), sb.id.clone());
            async move {
                (client.get_sandbox(&id).await.ok()?.status
                    == sandpit_sdk::types::SandboxStatus::Destroyed)
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    let names: Vec<String> = client
        .templates()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(
        names.contains(&"web2".to_string()) && !names.contains(&"web".to_string()),
        "{names:?}"
    );
    // The name builds again, as its next version (numbers are never reused).
    let t = client
        .create_template(&CreateTemplateRequest {
            name: "web".into(),
            dockerfile: Some("FROM base\n".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(t.version, 2);
    follow(&client, &t.id).await;
    client.delete_template("web", false).await.unwrap();
    client.delete_template("web2", false).await.unwrap();
    client.delete_template("img", false).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// `FROM scratch` + `ADD` of a local tarball with a ready command; `FROM` another
/// template; a failing RUN (exit code and output, CLI exits 1); bad input refused.
#[tokio::test]
async fn scratch_template_and_failures() {
    let srv = crate::server().await;
    let client = srv.client();

    let ctx = tempfile::tempdir().unwrap();
    let rootfs =
        busybox_rootfs_tar(|t| file(t, "etc/motd", b"scratch built\n", 0o644).unwrap()).unwrap();
    write(ctx.path(), "rootfs.tar", &rootfs);
    write(
        ctx.path(),
        "Dockerfile",
        b"FROM scratch\nADD rootfs.tar /\nENV PATH=/bin\nCMD [\"/bin/sh\", \"-c\", \"sleep 0.5; echo started > /tmp/started; exec sleep 100000\"]\n",
    );
    let dir = ctx.path().to_str().unwrap();
    let out = cli(
        &srv,
        &[
            "template",
            "build",
            dir,
            "--name",
            "mini",
            "--ready-command",
            "test -f /tmp/started",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let sb = create(&client, from("mini")).await;
    let out = sh(&client, &sb.id, "cat /etc/motd /tmp/started").await;
    assert_eq!(out.stdout, "scratch built\nstarted\n", "{out:?}");

    // FROM another template (a built one).
    let child = tempfile::tempdir().unwrap();
    write(
        child.path(),
        "Dockerfile",
        b"FROM mini\nRUN echo child > /child && cat /etc/motd\n",
    );
    let out = cli(
        &srv,
        &[
            "template",
            "build",
            child.path().to_str().unwrap(),
            "--name",
            "mini-child",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("scratch built"), "{}", text(&out));
    let sb2 = create(&client, from("mini-child")).await;
    let out = sh(&client, &sb2.id, "cat /child /tmp/started").await;
    assert_eq!(
        out.stdout, "child\nstarted\n",
        "the start command is inherited: {out:?}"
    );

    // A failing RUN: its output and exit code, exit status 1, template failed.
    let bad = tempfile::tempdir().unwrap();
    write(
        bad.path(),
        "Dockerfile",
        b"FROM base\nRUN echo about-to-fail && echo on-stderr >&2 && exit 7\n",
    );
    let out = cli(
        &srv,
        &[
            "template",
            "build",
            bad.path().to_str().unwrap(),
            "--name",
            "broken",
        ],
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("exit code 7") && log.contains("about-to-fail") && log.contains("on-stderr"),
        "{log}"
    );
    let t = client.get_template("broken").await.unwrap();
    assert_eq!(t.status, "failed");
    assert!(t.error.unwrap_or_default().contains("line 2"));
    assert_api_err(
        client.create_sandbox(&from("broken")).await,
        409,
        "template_not_ready",
    );

    // Bad input: a clear 400 naming the line, nothing created.
    let req = |name: &str, dockerfile: &str| CreateTemplateRequest {
        name: name.into(),
        dockerfile: Some(dockerfile.into()),
        ..Default::default()
    };
    assert_api_err(
        client
            .create_template(&req("x", "FROM base\nVOLUME /data\n"))
            .await,
        400,
        "invalid_dockerfile",
    );
    match client
        .create_template(&req("x", "FROM base\nRUN true\nFETCH it\n"))
        .await
    {
        Err(sandpit_sdk::SdkError::Api { message, .. }) => {
            assert!(message.contains("line 3"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_api_err(
        client
            .create_template(&req("Bad Name", "FROM base\n"))
            .await,
        400,
        "invalid_name",
    );
    // A built-in name (a workspace's own name builds its next version instead).
    assert_api_err(
        client.create_template(&req("base", "FROM base\n")).await,
        409,
        "template_exists",
    );
    let mut both = req("x", "FROM base\n");
    both.image = Some("busybox".into());
    assert_api_err(client.create_template(&both).await, 400, "invalid_source");
    let mut ctx_bad = req("x", "FROM base\n");
    ctx_bad.context = Some("bm90IGEgdGFy".into()); // "not a tar"
    assert_api_err(
        client.create_template(&ctx_bad).await,
        400,
        "invalid_context",
    );
    assert_api_err(client.get_template("x").await, 404, "template_not_found");

    // Another workspace sees none of it: not by name, id or alias. (`FROM mini` there would
    // be a Docker Hub lookup, which tests do not make.)
    client
        .set_template_alias("mini", "team@mini")
        .await
        .unwrap();
    let other_ws = client.create_workspace("other").await.unwrap();
    let other = client
        .create_token(
            &other_ws.id,
            &sandpit_sdk::types::TokenCreateRequest::default(),
        )
        .await
        .unwrap();
    let other = srv.client_with(&other.token.unwrap());
    let mini = client.get_template("mini").await.unwrap();
    for name in ["mini", mini.id.as_str(), "team@mini"] {
        assert_api_err(other.get_template(name).await, 404, "template_not_found");
        assert_api_err(
            other.create_sandbox(&from(name)).await,
            404,
            "template_not_found",
        );
        assert_api_err(
            other.delete_template(name, true).await,
            404,
            "template_not_found",
        );
    }
    let names: Vec<String> = other
        .templates()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["base", "toolchain"]);
    // Names are per workspace: "mini" is free there (nothing tells it exists here), a
    // built-in name is taken everywhere.
    let theirs = other
        .create_template(&req("mini", "FROM base\nENV WHOSE=theirs\n"))
        .await;
    let theirs = theirs.expect("the same name in another workspace");
    assert_ne!(theirs.id, mini.id);
    assert!(
        matches!(follow(&other, &theirs.id).await.last(), Some(TemplateBuildEvent::Finished { status, .. }) if status == "ready")
    );
    assert_eq!(
        client.get_template("mini").await.unwrap().id,
        mini.id,
        "ours unchanged"
    );
    assert_api_err(
        other.create_template(&req("base", "FROM base\n")).await,
        409,
        "template_exists",
    );

    client.destroy_sandbox(&sb.id).await.unwrap();
    client.destroy_sandbox(&sb2.id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// The offline toolchain template: built on demand with mmdebstrap through the host's apt
/// sources, then a sandbox with bash, python3, node and git. Minutes of downloads, so it
/// runs only with `SANDPIT_TEST_TOOLCHAIN=1`.
#[tokio::test]
async fn toolchain_template_on_demand() {
    if std::env::var_os("SANDPIT_TEST_TOOLCHAIN").is_none() {
        eprintln!("skipped: set SANDPIT_TEST_TOOLCHAIN=1 to build the toolchain template");
        return;
    }
    let srv = crate::server().await;
    let client = srv.client();
    assert_eq!(
        client.get_template("toolchain").await.unwrap().status,
        "not_built"
    );
    assert_api_err(
        client.create_sandbox(&from("toolchain")).await,
        409,
        "template_not_ready",
    );
    let started = std::time::Instant::now();
    let out = cli(&srv, &["template", "build-builtin", "toolchain"]);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("toolchain template built in {:?}", started.elapsed());
    let sb = create(&client, from("toolchain")).await;
    let out = sh(&client, &sb.id, "bash -c 'python3 -c \"print(6*7)\" && node -e \"console.log(6*7)\" && git --version | cut -d\" \" -f1-2 && echo $BASH_VERSION | cut -c1'").await;
    assert_eq!(out.stdout, "42\n42\ngit version\n5\n", "{out:?}");
    client.destroy_sandbox(&sb.id).await.unwrap();
    // Cached: a second request finds it built.
    let out = cli(&srv, &["template", "build-builtin", "toolchain"]);
    assert!(text(&out).contains("is built"), "{}", text(&out));
}

/// With boot snapshots on, a built template's start command runs once at build time, the
/// moment it is ready is checkpointed, and sandboxes restore it with the command running.
/// (The loop replaces its tick file by a rename: a reader between a truncate and a write
/// would see it empty.)
#[tokio::test]
async fn built_template_boot_snapshot_has_the_start_command_running() {
    let srv = TestServer::start_with(crate::bin(), &[("SANDPIT_BOOT_SNAPSHOTS", "true")])
        .await
        .expect("server starts");
    let client = srv.client();
    let t = client
        .create_template(&CreateTemplateRequest {
            name: "ticker".into(),
            dockerfile: Some(
                "FROM base\nCMD [\"/bin/sh\", \"-c\", \"echo start >> /tmp/starts; i=0; while true; do i=$((i+1)); echo $i > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 0.1; done\"]\n".into(),
            ),
            ready: Some(sandpit_sdk::types::ReadyCheck::Command("test -s /tmp/tick".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    let events = follow(&client, &t.id).await;
    assert!(
        matches!(events.last(), Some(TemplateBuildEvent::Finished { status, .. }) if status == "ready"),
        "{events:?}"
    );
    assert!(
        client.get_template("ticker").await.unwrap().boot_snapshot,
        "a boot snapshot was taken"
    );
    let sb = create(&client, from("ticker")).await;
    let a = sh(&client, &sb.id, "cat /tmp/tick").await.stdout;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let out = sh(&client, &sb.id, "cat /tmp/tick; cat /tmp/starts")
        .await
        .stdout;
    let mut lines = out.lines();
    assert_ne!(
        lines.next(),
        Some(a.trim()),
        "the restored loop keeps running"
    );
    assert_eq!(
        lines.collect::<Vec<_>>(),
        vec!["start"],
        "started once, at build time: {out}"
    );
    client.destroy_sandbox(&sb.id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// A registry behind the Docker bearer-token flow: the pull follows the challenge to the
/// token endpoint with the template's credentials, and fails without them.
#[tokio::test]
async fn registry_bearer_token_flow() {
    let registry = Registry::start(None).await.expect("registry starts");
    let rootfs =
        busybox_rootfs_tar(|t| file(t, "etc/motd", b"behind a token\n", 0o644).unwrap()).unwrap();
    registry
        .push(
            "sandpit/tok",
            "1",
            &[rootfs],
            serde_json::json!({"Env": ["PATH=/bin"]}),
        )
        .await
        .expect("push");
    let front = registry.bearer_front("puller", "pw").await.unwrap();
    let image = format!("{}/sandpit/tok:1", front.host);

    let srv = server_allowing(&[&front.host]).await;
    let client = srv.client();
    let build = |name: &str, password: &str| CreateTemplateRequest {
        name: name.into(),
        image: Some(image.clone()),
        registry_auth: Some(RegistryAuth {
            username: Some("puller".into()),
            password: Some(password.into()),
            token: None,
        }),
        ..Default::default()
    };
    let t = client
        .create_template(&build("wrong", "nope"))
        .await
        .unwrap();
    match follow(&client, &t.id).await.last() {
        Some(TemplateBuildEvent::Finished { status, .. }) => assert_eq!(status, "failed"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        front
            .tokens_issued
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    let t = client.create_template(&build("tok", "pw")).await.unwrap();
    let events = follow(&client, &t.id).await;
    assert!(
        matches!(events.last(), Some(TemplateBuildEvent::Finished { status, .. }) if status == "ready"),
        "{events:?}"
    );
    assert!(
        front
            .tokens_issued
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    let sb = create(&client, from("tok")).await;
    assert_eq!(
        sh(&client, &sb.id, "cat /etc/motd").await.stdout,
        "behind a token\n"
    );
    client.destroy_sandbox(&sb.id).await.unwrap();
}

/// A pull from a loopback registry the server does not list is refused (before any request
/// reaches it: see sandpit-image's tests) with an error that names the range and the flag.
#[tokio::test]
async fn pulls_from_unlisted_registries_are_refused() {
    let registry = Registry::start(None).await.expect("registry starts");
    let rootfs = busybox_rootfs_tar(|_| {}).unwrap();
    let image = registry
        .push(
            "sandpit/unlisted",
            "1",
            &[rootfs],
            serde_json::json!({"Env": ["PATH=/bin"]}),
        )
        .await
        .expect("push");
    // Allowed: another port of loopback only.
    let srv = server_allowing(&["127.0.0.1:1"]).await;
    let client = srv.client();
    let t = client
        .create_template(&CreateTemplateRequest {
            name: "unlisted".into(),
            image: Some(image.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let events = follow(&client, &t.id).await;
    let Some(TemplateBuildEvent::Finished { status, error, .. }) = events.last() else {
        panic!("{events:?}");
    };
    assert_eq!(status, "failed");
    let e = error.as_deref().unwrap_or_default();
    assert!(
        e.contains(&format!("{} is in loopback (127.0.0.0/8)", registry.host)),
        "{e}"
    );
    assert!(e.contains("--allowed-registries"), "{e}");
    client.delete_template("unlisted", false).await.unwrap();
}

/// Layer directories in a server's store.
fn layer_dirs(srv: &TestServer) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(srv.data_dir.join("images/layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect()
}

/// Template versions through the CLI and the API: building a name twice makes `web:1` and
/// `web:2` and moves `web`; a sandbox of version 1 keeps running and exec'ing after version
/// 2 exists and `web:1` still starts version 1; an alias stays until re-pointed; hostile
/// version strings are 400s that change nothing; `sandpit gc` removes the layers of a
/// deleted, unused version and keeps those in use.
#[tokio::test]
async fn template_versions_and_garbage_collection() {
    let srv = crate::server().await;
    let client = srv.client();
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        b"FROM base\nCOPY v.txt /v.txt\nRUN echo built >> /v.txt\n",
    );
    write(ctx.path(), "v.txt", b"one\n");
    let dir = ctx.path().to_str().unwrap();
    let build = || {
        let out = cli(&srv, &["template", "build", dir, "--name", "web"]);
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let cat = |id: String| {
        let client = client.clone();
        async move { sh(&client, &id, "cat /v.txt").await.stdout }
    };

    let log = build();
    assert!(log.contains("web:1"), "{log}");
    let v1_layers = layer_dirs(&srv);
    assert!(!v1_layers.is_empty());
    let old = create(&client, from("web")).await;
    let out = cli(&srv, &["template", "alias", "web", "team@stable"]);
    assert!(out.status.success(), "{}", text(&out));

    // The second build of the name: version 2, and the name moves to it.
    write(ctx.path(), "v.txt", b"two\n");
    let log = build();
    assert!(log.contains("web:2"), "{log}");
    assert!(!log.contains("template_exists"), "{log}");
    let v2_only: Vec<String> = layer_dirs(&srv).difference(&v1_layers).cloned().collect();
    assert_eq!(
        v2_only.len(),
        2,
        "COPY and RUN made new layers: {v2_only:?}"
    );
    let (web, web1) = (
        client.get_template("web").await.unwrap(),
        client.get_template("web:1").await.unwrap(),
    );
    assert_eq!((web.version, web.latest), (2, true));
    assert_eq!((web1.version, web1.latest), (1, false));
    let versions: Vec<u32> = client
        .template_versions("web")
        .await
        .unwrap()
        .iter()
        .map(|t| t.version)
        .collect();
    assert_eq!(versions, [1, 2]);
    let list = text(&cli(&srv, &["template", "list"]));
    assert!(list.contains("web:1") && list.contains("web:2"), "{list}");

    assert_eq!(
        cat(old.id.clone()).await,
        "one\nbuilt\n",
        "v1's sandbox runs on"
    );
    let new = create(&client, from("web")).await;
    assert_eq!(cat(new.id.clone()).await, "two\nbuilt\n");
    let pinned = create(&client, from("web:1")).await;
    assert_eq!(cat(pinned.id.clone()).await, "one\nbuilt\n");
    // The alias stayed on version 1 through the build; it moves when re-pointed.
    let stable = create(&client, from("team@stable")).await;
    assert_eq!(cat(stable.id.clone()).await, "one\nbuilt\n");
    let out = cli(&srv, &["template", "alias", "web:2", "team@stable"]);
    assert!(out.status.success(), "{}", text(&out));
    let moved = create(&client, from("team@stable")).await;
    assert_eq!(cat(moved.id.clone()).await, "two\nbuilt\n");
    assert_eq!(
        client.get_template("web:1").await.unwrap().aliases,
        Vec::<String>::new()
    );

    // Hostile version strings: 400, nothing changed.
    for bad in [
        "web:abc",
        "web:0",
        "web:1:2",
        "web:99999999999999999999",
        "web:-1",
        ":1",
    ] {
        assert_api_err(
            client.get_template(bad).await,
            400,
            "invalid_template_version",
        );
        assert_api_err(
            client.create_sandbox(&from(bad)).await,
            400,
            "invalid_template_version",
        );
        assert_api_err(
            client.delete_template(bad, true).await,
            400,
            "invalid_template_version",
        );
    }
    assert_eq!(client.template_versions("web").await.unwrap().len(), 2);

    // Version 1 is used: its delete is refused; once its sandboxes are gone it goes, and
    // gc removes its layers (a dry run first removes nothing) but not version 2's.
    assert_api_err(
        client.delete_template("web:1", false).await,
        409,
        "template_in_use",
    );
    for sb in [&old, &pinned, &stable] {
        client.destroy_sandbox(&sb.id).await.unwrap();
    }
    client.delete_template("web:1", false).await.unwrap();
    assert_api_err(
        client.get_template("web:1").await,
        404,
        "template_not_found",
    );
    let data_dir = srv.data_dir.to_str().unwrap().to_string();
    let mut gc = vec!["gc", "--data-dir", &data_dir, "--min-age", "0"];
    if let Some(db) = &srv.database {
        gc.extend(["--database", db.url.as_str()]);
    }
    let dry = cli(&srv, &[gc.as_slice(), &["--dry-run"][..]].concat());
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("would remove 2 layer(s)"),
        "{}",
        text(&dry)
    );
    assert!(
        layer_dirs(&srv).is_superset(&v1_layers),
        "a dry run removes nothing"
    );
    let out = cli(&srv, &gc);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("removed 2 layer(s)"), "{report}");
    let left = layer_dirs(&srv);
    for l in &v1_layers {
        assert!(!left.contains(l), "v1's layer {l} is gone: {report}");
        assert!(report.contains(l.as_str()), "{report}");
    }
    for l in &v2_only {
        assert!(left.contains(l), "v2's layer {l} stays: {report}");
    }
    // Version 2 still serves: its running sandbox and a new one.
    assert_eq!(cat(new.id.clone()).await, "two\nbuilt\n");
    let again = create(&client, from("web")).await;
    assert_eq!(cat(again.id.clone()).await, "two\nbuilt\n");
    // Deleting the name takes every version (here: the last), forced past its sandboxes.
    client.delete_template("web", true).await.unwrap();
    assert_api_err(client.get_template("web").await, 404, "template_not_found");
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
