//! The API when its PostgreSQL server goes away and comes back (a server of the test's own,
//! so it runs in the main pass, whatever database the other tests use).

use std::time::Duration;

use sandpit_test_support::{TestServer, wait_until};

use crate::{base, bin, create};

/// A PostgreSQL server of the test's own, on a port from `base_port` on.
struct OwnPostgres {
    dir: std::path::PathBuf,
    base: String,
}

impl OwnPostgres {
    fn start(name: &str, base_port: u32) -> OwnPostgres {
        let dir = std::path::PathBuf::from(format!("/tmp/sandpit-pg-{name}"));
        let script = format!(
            ". scripts/lib/postgres.sh; pg_start {} >/dev/null; trap - EXIT; echo \"$SANDPIT_TEST_POSTGRES\"",
            dir.display()
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .current_dir(sandpit_test_support::workspace_root())
            .env("SANDPIT_TEST_POSTGRES_PORT", base_port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let base = String::from_utf8_lossy(&out.stdout).trim().to_string();
        OwnPostgres { dir, base }
    }

    fn pg_ctl(&self, args: &str) {
        let script = format!(
            "bin=$(find /usr/lib/postgresql -maxdepth 3 -name pg_ctl -path '*/bin/*' | sort -V | tail -1); \
             runuser -u postgres -- \"$bin\" -D {}/data {args}",
            self.dir.display()
        );
        let ok = std::process::Command::new("bash")
            .args(["-c", &script])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pg_ctl {args}");
    }

    fn port(&self) -> &str {
        self.base.rsplit(':').next().unwrap()
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .args([
                "-c",
                &format!(
                    "bin=$(find /usr/lib/postgresql -maxdepth 3 -name pg_ctl -path '*/bin/*' | sort -V | tail -1); \
                     runuser -u postgres -- \"$bin\" -D {}/data -m immediate stop",
                    self.dir.display()
                ),
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PostgreSQL goes away under a running server and comes back: meanwhile the API answers
/// 503 `database_unavailable` (with `Retry-After`), never a 500, and a running sandbox is
/// left alone; afterwards everything works again without a restart.
#[tokio::test]
async fn the_api_answers_503_while_postgres_is_away_and_recovers() {
    // pg_start takes the first free port from here on.
    let pid = std::process::id();
    let pg = OwnPostgres::start(&format!("restart-{pid}"), 56000 + (pid % 400) * 10);
    let db = format!("sandpit_{}", std::process::id());
    let created = std::process::Command::new("psql")
        .args(["-X", "-q", "-d", &format!("{}/postgres", pg.base)])
        .args(["-c", &format!("CREATE DATABASE {db}")])
        .status()
        .unwrap();
    assert!(created.success());
    let url = format!("{}/{db}", pg.base);
    let srv = TestServer::start_with(bin(), &[("SANDPIT_DATABASE", url.as_str())])
        .await
        .unwrap();
    let client = srv.client();
    let sb = create(&client, base()).await;

    pg.pg_ctl("-m immediate stop");
    let http = reqwest::Client::new();
    let answer = http
        .get(format!("{}/v1/sandboxes/{}", srv.url, sb.id))
        .bearer_auth(&srv.token)
        .send()
        .await
        .unwrap();
    let retry = answer.headers().get("retry-after").cloned();
    let (status, code) = crate::previews::status_code(answer).await;
    assert_eq!((status, code.as_str()), (503, "database_unavailable"));
    assert!(retry.is_some(), "no Retry-After");
    let (status, code) = crate::previews::status_code(
        http.post(format!("{}/v1/sandboxes", srv.url))
            .bearer_auth(&srv.token)
            .json(&serde_json::json!({"template": "base"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (503, "database_unavailable"));

    pg.pg_ctl(&format!(
        "-l {}/server.log -w -t 60 -o \"-p {} -k {}/sock -c listen_addresses=127.0.0.1 -c fsync=off\" start",
        pg.dir.display(),
        pg.port(),
        pg.dir.display()
    ));
    wait_until(Duration::from_secs(60), "the API answers again", || async {
        client.get_sandbox(&sb.id).await.ok()
    })
    .await
    .unwrap();
    assert_eq!(
        crate::sh(&client, &sb.id, "echo back").await.stdout,
        "back\n"
    );
    let again = create(&client, base()).await;
    client.destroy_sandbox(&again.id).await.unwrap();
    client.destroy_sandbox(&sb.id).await.unwrap();
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}
