//! Hostile template builds against a real server (#12, holes 1, 2, 3, 5 and the archive
//! limits): build contexts and `RUN` steps that plant symlinks to host paths, special files
//! and a gzip bomb. Host canaries live outside the data dir; each test asserts they are
//! untouched (content and mode) and that the server answered with a clear error or built
//! something harmless. Part of the reliability suite (`security::builds::…`): the
//! `FIGURE bad_inputs` lines count what was tried.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use sandpit_sdk::Client;
use sandpit_sdk::types::{CreateTemplateRequest, TemplateBuildEvent};
use sandpit_test_support::TestServer;

/// A host directory outside every data dir with a file in it; `state` reads back what a
/// breach would change.
struct Canary {
    dir: tempfile::TempDir,
}

impl Canary {
    fn new() -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("sandpit-canary-")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::write(dir.path().join("resolv.conf"), "nameserver 192.0.2.1\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("resolv.conf"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Canary { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("resolv.conf")
    }

    /// Names, modes and contents of everything in the canary directory.
    fn state(&self) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = vec![(
            ".".to_string(),
            std::fs::metadata(self.path()).unwrap().mode(),
            Vec::new(),
        )];
        let mut names: Vec<_> = std::fs::read_dir(self.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        for p in names {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let body = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            out.push((p.display().to_string(), m.mode(), body));
        }
        out
    }
}

fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = header(tar::EntryType::Directory, mode, 0);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
    let mut h = header(tar::EntryType::Regular, 0o644, body.len() as u64);
    b.append_data(&mut h, path, body).unwrap();
}

fn add_symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &Path) {
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, path, target).unwrap();
}

fn request(name: &str, dockerfile: &str, context: &[u8]) -> CreateTemplateRequest {
    CreateTemplateRequest {
        name: name.into(),
        dockerfile: Some(dockerfile.into()),
        context: Some(base64::engine::general_purpose::STANDARD.encode(context)),
        ..Default::default()
    }
}

/// Start a build and wait for its end: `Ok(())` if it built, `Err(error text)` if it failed
/// (accepted and failed later) or was refused (the API's error).
async fn build(client: &Client, req: &CreateTemplateRequest) -> Result<(), String> {
    let t = client
        .create_template(req)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let stream = client.template_build_events(&t.id).await.unwrap();
    let events: Vec<_> = tokio::time::timeout(Duration::from_secs(300), stream.collect::<Vec<_>>())
        .await
        .expect("the build ends");
    match events.into_iter().filter_map(Result::ok).last() {
        Some(TemplateBuildEvent::Finished { status, error, .. }) if status == "ready" => {
            let _ = error;
            Ok(())
        }
        Some(TemplateBuildEvent::Finished { error, .. }) => Err(error.unwrap_or_default()),
        other => panic!("no end event: {other:?}"),
    }
}

/// Holes 1 and 2: a context whose symlinks name host paths, copied and unpacked.
#[tokio::test]
async fn build_contexts_never_write_or_chmod_through_their_symlinks() {
    let canary = Canary::new();
    let before = canary.state();
    let srv = crate::server().await;
    let client = srv.client();
    let mut tried = 0;

    // 1: `COPY d1 d2 /` with d1/x -> a host directory and d2/x/ holding a file.
    let ctx = tar_of(|b| {
        add_dir(b, "d1/", 0o755);
        add_symlink(b, "d1/x", canary.path());
        add_dir(b, "d2/x/", 0o4777);
        add_file(b, "d2/x/planted", b"pwned\n");
        add_file(b, "d2/x/resolv.conf", b"pwned\n");
    });
    let r = build(
        &client,
        &request("copy-through", "FROM scratch\nCOPY d1 d2 /\n", &ctx),
    )
    .await;
    tried += 1;
    // Built (the later directory replaced the symlink inside the layer) or refused; either
    // way nothing on the host.
    println!("copy through a symlink: {r:?}");
    assert_eq!(canary.state(), before, "the host directory changed");

    // 2: a directory `x` with mode 4777, then a symlink `x` -> a host file: in the context
    // and in an ADDed tarball.
    let evil = tar_of(|b| {
        add_dir(b, "x/", 0o4777);
        add_symlink(b, "x", &canary.file());
    });
    let r = build(&client, &request("mode-through", "FROM scratch\n", &evil)).await;
    tried += 1;
    println!("mode through a symlink (context): {r:?}");
    assert_eq!(canary.state(), before, "the host file's mode changed");
    let ctx = tar_of(|b| add_file(b, "evil.tar", &evil));
    let r = build(
        &client,
        &request("add-through", "FROM scratch\nADD evil.tar /\n", &ctx),
    )
    .await;
    tried += 1;
    println!("mode through a symlink (ADD): {r:?}");
    assert_eq!(canary.state(), before, "the host file's mode changed");

    // A COPY source through a symlink is refused with a message naming it.
    let ctx = tar_of(|b| add_symlink(b, "etc-link", canary.path()));
    let r = build(
        &client,
        &request(
            "source-through",
            "FROM scratch\nCOPY etc-link/resolv.conf /x\n",
            &ctx,
        ),
    )
    .await;
    tried += 1;
    let e = r.expect_err("a source through a symlink is refused");
    assert!(e.contains("symlink"), "{e}");
    assert_eq!(canary.state(), before);
    assert!(
        srv.leaks().is_empty(),
        "leaked after builds: {:?}",
        srv.leaks()
    );
    println!("FIGURE bad_inputs hostile_contexts={tried}");
}

/// Hole 3: a `RUN` step that makes `/etc` a symlink to a host directory; the host-side
/// clean-up of the step's layer must not delete `resolv.conf` there.
#[tokio::test]
async fn run_steps_cannot_aim_the_layer_clean_up_at_the_host() {
    let canary = Canary::new();
    let before = canary.state();
    let srv = crate::server().await;
    let client = srv.client();
    let dockerfile = format!(
        "FROM base\nRUN rm -rf /etc && ln -s {} /etc\n",
        canary.path().display()
    );
    let r = build(&client, &request("etc-link", &dockerfile, &tar_of(|_| {}))).await;
    println!("RUN that links /etc to a host dir: {r:?}");
    assert!(canary.file().exists(), "the host's file was deleted");
    assert_eq!(canary.state(), before);
    println!("FIGURE bad_inputs hostile_run_layers=1");
}

/// Hole 5 and the archive limits: a `.dockerignore` that is `/dev/zero`, a FIFO, and a
/// gzip bomb as context and as an ADDed tarball. The server's memory stays bounded (it
/// answers and its RSS stays far below what the inputs would inflate to).
#[tokio::test]
async fn special_files_and_archive_bombs_are_refused_with_bounded_memory() {
    let srv = TestServer::start_with(crate::bin(), &[("SANDPIT_ARCHIVE_MAX_BYTES", "64M")])
        .await
        .expect("server starts");
    let client = srv.client();
    let mut tried = 0;

    let ctx = tar_of(|b| add_symlink(b, ".dockerignore", Path::new("/dev/zero")));
    let e = build(&client, &request("zero-ignore", "FROM scratch\n", &ctx))
        .await
        .expect_err("a .dockerignore that is /dev/zero is refused");
    tried += 1;
    assert!(e.contains(".dockerignore"), "{e}");

    let ctx = tar_of(|b| {
        let mut h = header(tar::EntryType::Fifo, 0o644, 0);
        b.append_data(&mut h, ".dockerignore", std::io::empty())
            .unwrap();
    });
    let e = build(&client, &request("fifo-ignore", "FROM scratch\n", &ctx))
        .await
        .expect_err("a FIFO .dockerignore is refused");
    tried += 1;
    assert!(e.contains(".dockerignore"), "{e}");

    // 256 MiB of zeros in a gzip of a few hundred KiB, past the 64M limit.
    let bomb = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut b = tar::Builder::new(&mut gz);
        let mut h = header(tar::EntryType::Regular, 0o644, 256 << 20);
        b.append_data(
            &mut h,
            "zeros",
            std::io::Read::take(std::io::repeat(0), 256 << 20),
        )
        .unwrap();
        b.finish().unwrap();
        drop(b);
        gz.finish().unwrap()
    };
    assert!(bomb.len() < 2 << 20, "bomb is {} bytes", bomb.len());
    let e = client
        .create_template(&request("bomb", "FROM scratch\n", &bomb))
        .await
        .expect_err("a context bomb is refused at once");
    tried += 1;
    let e = format!("{e:?}");
    assert!(e.contains("archive_too_large"), "{e}");
    let ctx = tar_of(|b| add_file(b, "bomb.tar.gz", &bomb));
    let e = build(
        &client,
        &request("add-bomb", "FROM scratch\nADD bomb.tar.gz /\n", &ctx),
    )
    .await
    .expect_err("an ADDed bomb fails the build");
    tried += 1;
    assert!(e.contains("archive_too_large"), "{e}");

    // Still serving, and nothing left behind in the image store's temp dir.
    client.templates().await.expect("the server answers");
    if let Some(rss) = srv.rss_bytes() {
        assert!(rss < 1 << 30, "server RSS {rss} bytes");
    }
    let tmp = srv.data_dir.join("images/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in images/tmp: {left:?}");
    println!("FIGURE bad_inputs hostile_archives={tried}");
}
