//! `.dockerignore`: which files of a build context `COPY` and `ADD` never see.
//!
//! Patterns are relative to the context root; `*` and `?` stay within one path component,
//! `**` spans any number of them, a leading `!` re-includes, and the last matching pattern
//! wins. A pattern that matches a directory excludes everything under it.

#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    rules: Vec<(bool, Vec<String>)>,
}

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

    /// Read `<context>/.dockerignore` if there is one.
    pub fn load(context: &std::path::Path) -> IgnoreRules {
        std::fs::read_to_string(context.join(".dockerignore"))
            .map(|t| IgnoreRules::parse(&t))
            .unwrap_or_default()
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
