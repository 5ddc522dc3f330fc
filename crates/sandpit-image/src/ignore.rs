//! `.dockerignore`: which files of a build context `COPY` and `ADD` never see.
//!
//! Patterns are relative to the context root; `*` and `?` stay within one path component,
//! `**` spans any number of them, a leading `!` re-includes, and the last matching pattern
//! wins. A pattern that matches a directory excludes everything under it.

#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    rules: Vec<(bool, Vec<String>)>,
}

/// The largest `.dockerignore` a build reads.
pub const MAX_IGNORE_FILE: u64 = 1 << 20;

impl IgnoreRules {
    pub fn parse(text: &str) -> IgnoreRules {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (include, pat) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let parts = pat
                    .split('/')
                    .filter(|c| !c.is_empty() && *c != ".")
                    .map(String::from)
                    .collect();
                (include, parts)
            })
            .filter(|(_, p): &(bool, Vec<String>)| !p.is_empty())
            .collect();
        IgnoreRules { rules }
    }

    /// Read the context's `.dockerignore` if there is one: a regular file of at most
    /// [`MAX_IGNORE_FILE`] bytes (a symlink, FIFO or device in its place is refused).
    pub fn load(context: &sandpit_fs::TreeDir) -> Result<IgnoreRules, String> {
        match context.read_capped(std::path::Path::new(".dockerignore"), MAX_IGNORE_FILE) {
            Ok(bytes) => Ok(IgnoreRules::parse(&String::from_utf8_lossy(&bytes))),
            Err(e) if e.is_not_found() => Ok(IgnoreRules::default()),
            Err(e) => Err(format!("reading .dockerignore: {e}")),
        }
    }

    /// Whether the context-relative path `rel` (components joined with `/`) is excluded.
    pub fn is_ignored(&self, rel: &str) -> bool {
        let path: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
        let mut ignored = false;
        for (include, pat) in &self.rules {
            // The path itself or one of its parent directories matches.
            let hit = (1..=path.len()).any(|n| match_parts(pat, &path[..n]));
            if hit {
                ignored = !include;
            }
        }
        ignored
    }
}

fn match_parts(pat: &[String], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if p == "**" => {
            (0..=path.len()).any(|skip| match_parts(rest, &path[skip..]))
        }
        Some((p, rest)) => match path.split_first() {
            Some((first, tail)) => {
                match_component(p.as_bytes(), first.as_bytes()) && match_parts(rest, tail)
            }
            None => false,
        },
    }
}

fn match_component(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| match_component(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && match_component(rest, &s[1..]),
        Some((b'\\', rest)) if !rest.is_empty() => {
            s.first() == Some(&rest[0]) && match_component(&rest[1..], &s[1..])
        }
        Some((c, rest)) => s.first() == Some(c) && match_component(rest, &s[1..]),
    }
}

/// Whether a `COPY` source pattern (one component) matches a name.
pub fn component_matches(pattern: &str, name: &str) -> bool {
    match_component(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_semantics() {
        let r = IgnoreRules::parse(
            "# comment\n*.log\n/build\n**/node_modules\nsecret*\n!secret.pub\ndocs/*.md\n",
        );
        assert!(r.is_ignored("a.log"));
        assert!(!r.is_ignored("dir/a.log"), "* does not cross directories");
        assert!(
            r.is_ignored("build/out/x.o"),
            "a matched directory takes its contents"
        );
        assert!(r.is_ignored("x/y/node_modules/p/index.js"));
        assert!(r.is_ignored("node_modules"));
        assert!(r.is_ignored("secret.key"));
        assert!(!r.is_ignored("secret.pub"), "the last match wins");
        assert!(r.is_ignored("docs/a.md"));
        assert!(!r.is_ignored("docs/sub/a.md"));
        assert!(!r.is_ignored("src/main.rs"));
        assert!(!IgnoreRules::default().is_ignored("anything"));
    }
}

/// Pack a build context directory into a gzip tar for upload, leaving out what
/// `.dockerignore` excludes (the Dockerfile and `.dockerignore` always go). Symlinks are
/// packed as symlinks, never followed.
#[expect(
    clippy::disallowed_methods,
    reason = "runs in the CLI on the user's own directory, not on the server"
)]
pub fn pack_context(dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    // The client's own directory on its own machine: the tree is the user's, not a tenant's.
    let rules = sandpit_fs::TreeDir::open(dir)
        .map_err(std::io::Error::other)
        .and_then(|d| IgnoreRules::load(&d).map_err(std::io::Error::other))?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    fn walk(
        tar: &mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>,
        rules: &IgnoreRules,
        root: &std::path::Path,
        rel: &str,
    ) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().to_string();
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let always = rel.is_empty() && (name == "Dockerfile" || name == ".dockerignore");
            if !always && rules.is_ignored(&r) {
                continue;
            }
            let ft = e.file_type()?;
            if ft.is_dir() {
                tar.append_dir(&r, e.path())?;
                walk(tar, rules, root, &r)?;
            } else if ft.is_file() || ft.is_symlink() {
                tar.append_path_with_name(e.path(), &r)?;
            }
        }
        Ok(())
    }
    walk(&mut tar, &rules, dir, "")?;
    tar.into_inner()?.finish()
}

#[cfg(test)]
mod pack_tests {
    #[test]
    fn packs_what_is_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "*.log\nDockerfile\n").unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/a"), "a").unwrap();
        std::fs::write(dir.path().join("x.log"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let packed = super::pack_context(dir.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let f = out.path().join("c.tgz");
        std::fs::write(&f, packed).unwrap();
        let unpacked = out.path().join("u");
        std::fs::create_dir(&unpacked).unwrap();
        crate::unpack::unpack(
            crate::unpack::open_blob(&f).unwrap(),
            &unpacked,
            crate::unpack::Whiteouts::Plain,
        )
        .unwrap();
        assert!(unpacked.join("Dockerfile").is_file());
        assert!(unpacked.join("src/a").is_file());
        assert!(!unpacked.join("x.log").exists());
        assert_eq!(
            std::fs::read_link(unpacked.join("link")).unwrap(),
            std::path::Path::new("/etc/passwd")
        );
    }
}
