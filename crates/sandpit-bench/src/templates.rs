//! Template benchmarks: pull + unpack throughput from a local registry, a cold Dockerfile
//! build against a rebuild after changing its last step, and the time from a finished
//! build to the first sandbox of the template answering exec.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use futures::StreamExt;
use sandpit_sdk::Client;
use sandpit_sdk::types::{CreateSandboxRequest, CreateTemplateRequest, TemplateBuildEvent};
use sandpit_test_support::TestServer;
use sandpit_test_support::registry::{Registry, busybox_rootfs_tar, file};

use crate::{Row, exec_true, row};

/// Follow a build to its end; the build's own elapsed time.
async fn wait_build(client: &Client, id: &str) -> anyhow::Result<Duration> {
    let mut events = Box::pin(client.template_build_events(id).await?);
    while let Some(ev) = events.next().await {
        if let TemplateBuildEvent::Finished {
            status,
            error,
            elapsed_ms,
        } = ev?
        {
            if status != "ready" {
                bail!("build {id} failed: {}", error.unwrap_or_default());
            }
            return Ok(Duration::from_millis(elapsed_ms));
        }
    }
    bail!("build {id}: event stream ended early")
}

/// Incompressible bytes (xorshift), so the gzip layer is as large as its content.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn context_tar(files: &[(&str, &[u8])]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    for (rel, body) in files {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(p, body)?;
    }
    let packed = sandpit_image::ignore::pack_context(dir.path())?;
    Ok(base64::engine::general_purpose::STANDARD.encode(packed))
}

pub async fn bench(sandpit: &Path, platform: &str, quick: bool) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let registry = Registry::start(None).await?;
    let srv = TestServer::start_with(
        sandpit,
        &[
            ("SANDPIT_PLATFORM", platform),
            ("SANDPIT_ALLOWED_REGISTRIES", &registry.host),
        ],
    )
    .await?;
    let client = srv.client();

    // Pull + unpack: a busybox layer plus a 64 MiB layer of 256 KiB files, new content each
    // round so nothing comes from the layer store.
    let mb = if quick { 16 } else { 64 };
    let rounds = if quick { 1 } else { 3 };
    let (mut pulls, mut bytes) = (Vec::new(), 0usize);
    for i in 0..rounds {
        let base = busybox_rootfs_tar(|_| {})?;
        let mut data = tar::Builder::new(Vec::new());
        for f in 0..(mb * 4) {
            file(
                &mut data,
                &format!("data/f{f:04}"),
                &noise(256 * 1024, (i * 100_000 + f) as u64 + 7),
                0o644,
            )?;
        }
        let data = data.into_inner()?;
        bytes = base.len() + data.len();
        let reference = registry
            .push(
                "bench/pull",
                &format!("r{i}"),
                &[base, data],
                serde_json::json!({"Env": ["PATH=/bin"]}),
            )
            .await?;
        let t = Instant::now();
        let tpl = client
            .create_template(&CreateTemplateRequest {
                name: format!("pull-{i}"),
                image: Some(reference),
                ..Default::default()
            })
            .await?;
        wait_build(&client, &tpl.id).await?;
        pulls.push(t.elapsed());
    }
    let mut r = row(
        &format!(
            "template from image: pull + unpack {} MB",
            bytes / 1_000_000
        ),
        &pulls,
        None,
        "",
    );
    r.mb_per_s = Some(bytes as f64 / 1e6 / (crate::percentile(&pulls, 0.5) / 1000.0));
    rows.push(r);

    // Cold build of a 3-step Dockerfile (fresh cache: a new base image), then a rebuild
    // after changing its last step.
    let base = busybox_rootfs_tar(|t| file(t, "etc/bench", b"bench\n", 0o644).expect("tar"))?;
    let image = registry
        .push(
            "bench/base",
            "1",
            &[base],
            serde_json::json!({"Env": ["PATH=/bin"]}),
        )
        .await?;
    let context = context_tar(&[
        ("app/blob.bin", &noise(8 << 20, 99)),
        ("app/readme", b"bench app\n"),
    ])?;
    let dockerfile = |last: &str| {
        format!(
            "FROM {image}\nRUN mkdir -p /srv/gen && for i in $(seq 1 300); do echo line-$i > /srv/gen/f$i; done && dd if=/dev/zero of=/srv/zero bs=1M count=32 2>/dev/null\nCOPY app/ /srv/app/\nRUN echo {last} > /srv/version\n"
        )
    };
    let build = |name: String, dockerfile: String| {
        let client = client.clone();
        let context = context.clone();
        async move {
            let t = Instant::now();
            let tpl = client
                .create_template(&CreateTemplateRequest {
                    name,
                    dockerfile: Some(dockerfile),
                    context: Some(context),
                    ..Default::default()
                })
                .await?;
            wait_build(&client, &tpl.id).await?;
            anyhow::Ok(t.elapsed())
        }
    };
    let cold = build("cold".into(), dockerfile("v0")).await?;
    let mut rebuilt = Vec::new();
    for i in 0..(if quick { 2 } else { 5 }) {
        rebuilt.push(build(format!("rebuild-{i}"), dockerfile(&format!("v{}", i + 1))).await?);
    }
    let mut r = row(
        "Dockerfile build, cold (FROM registry + RUN + COPY 8 MB + RUN)",
        &[cold],
        None,
        "",
    );
    r.value = Some(cold.as_secs_f64() * 1000.0);
    r.unit = Some("ms".into());
    rows.push(r);
    let mut r = row(
        "rebuild after changing the last step",
        &rebuilt,
        None,
        "≤ 10% of cold",
    );
    r.value = Some(crate::percentile(&rebuilt, 0.5) / (cold.as_secs_f64() * 1000.0) * 100.0);
    r.unit = Some("% of cold".into());
    rows.push(r);

    // Build finished → first sandbox answers exec, for a template whose start command
    // serves HTTP (ready when its port listens).
    let mut first = Vec::new();
    for i in 0..(if quick { 2 } else { 5 }) {
        let tpl = client
            .create_template(&CreateTemplateRequest {
                name: format!("web-{i}"),
                dockerfile: Some(format!(
                    "FROM {image}\nRUN mkdir /www && echo hi{i} > /www/index.html\nEXPOSE 8080\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
                )),
                ..Default::default()
            })
            .await?;
        wait_build(&client, &tpl.id).await?;
        let t = Instant::now();
        let sb = client
            .create_sandbox(&CreateSandboxRequest {
                template: tpl.name.clone(),
                ..Default::default()
            })
            .await
            .context("creating from the built template")?;
        exec_true(&client, &sb.id).await?;
        first.push(t.elapsed());
        client.destroy_sandbox(&sb.id).await?;
    }
    rows.push(row(
        "build finished → first sandbox answers exec (start command ready)",
        &first,
        None,
        "",
    ));
    drop(srv);
    drop(registry);
    Ok(rows)
}
