//! Users: a Dockerfile's `USER` is who exec, terminals and uploaded files run as or belong
//! to; exec's `user` overrides it; the base template (no `USER`) stays root.

use sandpit_sdk::Client;
use sandpit_sdk::types::{
    CreateSandboxRequest, CreateTemplateRequest, ExecRequest, TerminalCreateRequest,
};

use crate::templates::follow;
use crate::terminals::Viewer;
use crate::{assert_api_err, base, create, server, sh};

async fn id_as(client: &Client, id: &str, user: Option<&str>) -> String {
    let out = client
        .exec(
            id,
            &ExecRequest {
                command: Some("echo $(id -u):$(id -g):$HOME".into()),
                user: user.map(str::to_string),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("exec as {user:?}: {e:?}"));
    assert_eq!(out.exit_code, 0, "{out:?}");
    out.stdout.trim().to_string()
}

#[tokio::test]
async fn template_user_is_the_default_and_exec_overrides_it() {
    let srv = server().await;
    let client = srv.client();
    let t = client
        .create_template(&CreateTemplateRequest {
            name: "app".into(),
            dockerfile: Some(
                // The base template's busybox has no adduser: the entries are written.
                "FROM base\nRUN (grep -q '^root:' /etc/passwd 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >> /etc/passwd) && echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && (grep -q '^root:' /etc/group 2>/dev/null || echo 'root:x:0:' >> /etc/group) && echo 'app:x:1000:' >> /etc/group && echo 'extra:x:2000:app' >> /etc/group && mkdir -p /home/app && chown 1000:1000 /home/app\nUSER app\n"
                    .into(),
            ),
            ..Default::default()
        })
        .await
        .unwrap();
    let events = follow(&client, &t.id).await;
    let built = client.get_template("app").await.unwrap();
    assert_eq!(built.status, "ready", "{events:#?}");
    let sb = create(
        &client,
        CreateSandboxRequest {
            template: "app".into(),
            ..base()
        },
    )
    .await;
    let id = sb.id.as_str();

    // The template's USER, with its supplementary groups and home.
    assert_eq!(id_as(&client, id, None).await, "1000:1000:/home/app");
    assert_eq!(sh(&client, id, "id -G").await.stdout.trim(), "1000 2000");
    assert_eq!(id_as(&client, id, Some("root")).await, "0:0:/root");
    assert_eq!(id_as(&client, id, Some("0:0")).await, "0:0:/root");
    assert_eq!(
        id_as(&client, id, Some("app:extra")).await,
        "1000:2000:/home/app"
    );
    let exec = |user: &str| ExecRequest {
        command: Some("touch /tmp/ran".into()),
        user: Some(user.into()),
        ..Default::default()
    };
    assert_api_err(
        client.exec(id, &exec("nobody-here")).await,
        400,
        "user_not_found",
    );
    assert_api_err(client.exec(id, &exec("../root")).await, 400, "invalid_user");
    assert_api_err(client.exec(id, &exec("a:b:c")).await, 400, "invalid_user");
    assert_eq!(
        sh(&client, id, "test -e /tmp/ran; echo $?")
            .await
            .stdout
            .trim(),
        "1"
    );

    // Uploads (and the directories made for them) belong to the template's USER.
    client.upload(id, "/tmp/new/dir/f.txt", "hi").await.unwrap();
    let out = sh(
        &client,
        id,
        "stat -c %u:%g /tmp/new /tmp/new/dir /tmp/new/dir/f.txt",
    )
    .await;
    assert_eq!(out.stdout, "1000:1000\n1000:1000\n1000:1000\n", "{out:?}");

    // A terminal's shell runs as the template's USER.
    client
        .create_terminal(
            id,
            &TerminalCreateRequest {
                id: Some("t".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut v = Viewer::attach(&client, id, "t", true).await;
    v.type_("echo uid=$(id -u)=\r").await;
    v.expect("uid=1000=").await;

    // The base template has no USER: root.
    let plain = create(&client, base()).await;
    assert_eq!(id_as(&client, &plain.id, None).await, "0:0:/root");
}
