//! A Dockerfile parser: logical lines (continuations, comments), the instructions a
//! template build supports, exec (JSON) and shell forms, and `$VAR` / `${VAR}` /
//! `${VAR:-default}` / `${VAR:+alt}` substitution (applied by the build, which knows the
//! values). Anything else is refused with the line it is on.

use crate::ImageError;

/// One instruction, with the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub line: usize,
    /// The instruction as written, continuations joined (for logs and cache keys).
    pub text: String,
    pub kind: Kind,
}

/// A command in exec form (`["a", "b"]`) or shell form (`a b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Exec(Vec<String>),
    Shell(String),
}

impl Command {
    /// The argv to run: shell form through `/bin/sh -c`.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Exec(a) => a.clone(),
            Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `FROM image|template|scratch` (`AS name` and `--platform` are accepted and ignored).
    From {
        image: String,
    },
    Run(Command),
    /// `COPY` and `ADD` (`add`: local tarballs are unpacked).
    Copy {
        add: bool,
        sources: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<String>,
    },
    Env(Vec<(String, String)>),
    Arg {
        name: String,
        default: Option<String>,
    },
    Workdir(String),
    User(String),
    Expose(Vec<String>),
    Cmd(Command),
    Entrypoint(Command),
    /// `HEALTHCHECK CMD …` is the template's ready check; `HEALTHCHECK NONE` clears it.
    Healthcheck(Option<Command>),
    /// `LABEL` (kept for compatibility; templates have no labels).
    Label,
}

/// Parse a whole Dockerfile.
pub fn parse(text: &str) -> Result<Vec<Instruction>, ImageError> {
    let mut out = Vec::new();
    for (line, logical) in logical_lines(text) {
        out.push(parse_instruction(line, &logical)?);
    }
    let Some(first) = out.iter().find(|i| !matches!(i.kind, Kind::Arg { .. })) else {
        return Err(ImageError::Dockerfile {
            line: 1,
            message: "no FROM instruction".into(),
        });
    };
    if !matches!(first.kind, Kind::From { .. }) {
        return Err(ImageError::Dockerfile {
            line: first.line,
            message: "the first instruction (after ARG) must be FROM".into(),
        });
    }
    if let Some(second) = out
        .iter()
        .filter(|i| matches!(i.kind, Kind::From { .. }))
        .nth(1)
    {
        return Err(ImageError::Dockerfile {
            line: second.line,
            message: "multi-stage builds (a second FROM) are not supported".into(),
        });
    }
    Ok(out)
}

/// Join continuation lines; drop comments and blank lines. Yields (first line number, text).
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.starts_with('#') || (trimmed.is_empty() && cur.is_none()) {
            continue; // comments are dropped even inside a continuation, as Docker does
        }
        let (body, continues) = match raw.trim_end().strip_suffix('\\') {
            Some(b) => (b, true),
            None => (raw.trim_end(), false),
        };
        match &mut cur {
            Some((_, acc)) => {
                acc.push(' ');
                acc.push_str(body.trim());
            }
            None => cur = Some((i + 1, body.trim().to_string())),
        }
        if !continues && let Some(done) = cur.take() {
            out.push(done);
        }
    }
    out.extend(cur);
    out
}

fn parse_instruction(line: usize, text: &str) -> Result<Instruction, ImageError> {
    let err = |message: String| ImageError::Dockerfile { line, message };
    let (word, rest) = match text.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (text, ""),
    };
    let keyword = word.to_ascii_uppercase();
    let need = |what: &str| {
        if rest.is_empty() {
            Err(err(format!("{keyword} needs {what}")))
        } else {
            Ok(())
        }
    };
    let kind = match keyword.as_str() {
        "FROM" => {
            need("an image, a template name or scratch")?;
            let words: Vec<&str> = rest
                .split_whitespace()
                .filter(|w| !w.starts_with("--platform"))
                .collect();
            match words.as_slice() {
                [image] => Kind::From {
                    image: image.to_string(),
                },
                [image, kw, _name] if kw.eq_ignore_ascii_case("as") => Kind::From {
                    image: image.to_string(),
                },
                _ => return Err(err(format!("cannot read FROM {rest:?}"))),
            }
        }
        "RUN" => {
            need("a command")?;
            if rest.starts_with("--") {
                let flag = rest.split_whitespace().next().unwrap_or_default();
                return Err(err(format!("RUN {flag} is not supported")));
            }
            no_heredoc(rest).map_err(err)?;
            Kind::Run(command(rest))
        }
        "COPY" | "ADD" => {
            need("a source and a destination")?;
            no_heredoc(rest).map_err(err)?;
            let (mut chown, mut chmod) = (None, None);
            let mut body = rest;
            while let Some(flag) = body.strip_prefix("--") {
                let (f, r) = flag.split_once(char::is_whitespace).unwrap_or((flag, ""));
                match f.split_once('=') {
                    Some(("chown", v)) => chown = Some(v.to_string()),
                    Some(("chmod", v)) => chmod = Some(v.to_string()),
                    Some(("from", _)) => {
                        return Err(err(
                            "COPY --from is not supported (multi-stage builds are not)".into(),
                        ));
                    }
                    _ => return Err(err(format!("{keyword} --{f} is not supported"))),
                }
                body = r.trim_start();
            }
            let mut words = match json_array(body) {
                Some(a) => a,
                None => body.split_whitespace().map(String::from).collect(),
            };
            if words.len() < 2 {
                return Err(err(format!(
                    "{keyword} needs at least one source and a destination"
                )));
            }
            let dest = words.pop().expect("two or more");
            Kind::Copy {
                add: keyword == "ADD",
                sources: words,
                dest,
                chown,
                chmod,
            }
        }
        "ENV" => {
            need("NAME=value")?;
            Kind::Env(env_pairs(rest).map_err(err)?)
        }
        "ARG" => {
            need("a name")?;
            let (name, default) = match rest.split_once('=') {
                Some((n, d)) => (n.trim(), Some(unquote(d.trim()))),
                None => (rest, None),
            };
            if !valid_name(name) {
                return Err(err(format!("invalid ARG name {name:?}")));
            }
            Kind::Arg {
                name: name.into(),
                default,
            }
        }
        "WORKDIR" => {
            need("a directory")?;
            Kind::Workdir(unquote(rest))
        }
        "USER" => {
            need("a user")?;
            Kind::User(rest.to_string())
        }
        "EXPOSE" => {
            need("a port")?;
            Kind::Expose(rest.split_whitespace().map(String::from).collect())
        }
        "CMD" => {
            need("a command")?;
            Kind::Cmd(command(rest))
        }
        "ENTRYPOINT" => {
            need("a command")?;
            Kind::Entrypoint(command(rest))
        }
        "HEALTHCHECK" => {
            let mut body = rest;
            while let Some(flag) = body.strip_prefix("--") {
                // --interval, --timeout, --retries …: the ready check polls on its own terms.
                body = flag
                    .split_once(char::is_whitespace)
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or("");
            }
            let (w, r) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
            match w.to_ascii_uppercase().as_str() {
                "NONE" => Kind::Healthcheck(None),
                "CMD" if !r.trim().is_empty() => Kind::Healthcheck(Some(command(r.trim()))),
                _ => return Err(err("HEALTHCHECK needs CMD <command> or NONE".into())),
            }
        }
        "LABEL" | "MAINTAINER" => Kind::Label,
        "ONBUILD" | "STOPSIGNAL" | "SHELL" | "VOLUME" => {
            return Err(err(format!("unsupported instruction {keyword}")));
        }
        _ => return Err(err(format!("unknown instruction {word:?}"))),
    };
    Ok(Instruction {
        line,
        text: text.to_string(),
        kind,
    })
}

fn no_heredoc(rest: &str) -> Result<(), String> {
    let heredoc = rest.split_whitespace().any(|w| {
        w.strip_prefix("<<").is_some_and(|t| {
            let t = t.trim_start_matches('-').trim_start_matches(['"', '\'']);
            t.starts_with(|c: char| c.is_ascii_alphabetic())
        })
    });
    if heredoc {
        Err("heredocs (<<EOF) are not supported".into())
    } else {
        Ok(())
    }
}

fn command(rest: &str) -> Command {
    match json_array(rest) {
        Some(a) => Command::Exec(a),
        None => Command::Shell(rest.to_string()),
    }
}

fn json_array(s: &str) -> Option<Vec<String>> {
    if !s.starts_with('[') {
        return None;
    }
    serde_json::from_str(s).ok()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !n.as_bytes()[0].is_ascii_digit()
}

fn unquote(s: &str) -> String {
    words(s)
        .map(|w| w.join(" "))
        .unwrap_or_else(|_| s.to_string())
}

/// Split on unquoted whitespace, removing quotes and backslash escapes.
fn words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (_, c) => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn env_pairs(rest: &str) -> Result<Vec<(String, String)>, String> {
    let first = rest.split_whitespace().next().unwrap_or_default();
    if !first.contains('=') {
        // Legacy `ENV NAME value with spaces`.
        let (name, value) = rest
            .split_once(char::is_whitespace)
            .ok_or("ENV NAME needs a value")?;
        if !valid_name(name) {
            return Err(format!("invalid ENV name {name:?}"));
        }
        return Ok(vec![(name.into(), value.trim().into())]);
    }
    words(rest)?
        .into_iter()
        .map(|w| {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("expected NAME=value, got {w:?}"))?;
            if !valid_name(k) {
                return Err(format!("invalid ENV name {k:?}"));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Substitute `$NAME`, `${NAME}`, `${NAME:-default}` and `${NAME:+alt}` from `lookup`;
/// `\$` stays a literal `$`. Unknown names become empty, as in Docker.
pub fn substitute(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'$') {
            out.push('$');
            i += 2;
            continue;
        }
        if b[i] != b'$' {
            let ch = s[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        if b.get(i + 1) == Some(&b'{') {
            if let Some(end) = s[i + 2..].find('}') {
                let inner = &s[i + 2..i + 2 + end];
                let value = if let Some((name, default)) = inner.split_once(":-") {
                    lookup(name)
                        .filter(|v| !v.is_empty())
                        .unwrap_or_else(|| default.to_string())
                } else if let Some((name, alt)) = inner.split_once(":+") {
                    lookup(name)
                        .filter(|v| !v.is_empty())
                        .map(|_| alt.to_string())
                        .unwrap_or_default()
                } else {
                    lookup(inner).unwrap_or_default()
                };
                out.push_str(&value);
                i += 3 + end;
                continue;
            }
        } else {
            let len = s[i + 1..]
                .bytes()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
                .count();
            if len > 0 {
                out.push_str(&lookup(&s[i + 1..i + 1 + len]).unwrap_or_default());
                i += 1 + len;
                continue;
            }
        }
        out.push('$');
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_dockerfile() {
        let text = r#"
# syntax comment
ARG BASE=base
FROM ${BASE} AS build
ENV A=1 B="two words" \
    C=3
ENV LEGACY some value
RUN echo hi && \
  # a comment inside a continuation
  echo there
COPY --chown=1:1 a.txt b/ /dest/
ADD ["x y.tar", "/opt/"]
WORKDIR /app
USER nobody
EXPOSE 8080/tcp 9090
HEALTHCHECK --interval=1s CMD wget -q -O- http://127.0.0.1:8080/
CMD ["sh", "-c", "httpd -f"]
"#;
        let ins = parse(text).unwrap();
        assert_eq!(
            ins[0].kind,
            Kind::Arg {
                name: "BASE".into(),
                default: Some("base".into())
            }
        );
        assert_eq!(
            ins[1].kind,
            Kind::From {
                image: "${BASE}".into()
            }
        );
        assert_eq!(ins[2].line, 5);
        assert_eq!(
            ins[2].kind,
            Kind::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "3".into())
            ])
        );
        assert_eq!(
            ins[3].kind,
            Kind::Env(vec![("LEGACY".into(), "some value".into())])
        );
        assert_eq!(
            ins[4].kind,
            Kind::Run(Command::Shell("echo hi && echo there".into()))
        );
        assert_eq!(ins[4].line, 8);
        assert_eq!(
            ins[5].kind,
            Kind::Copy {
                add: false,
                sources: vec!["a.txt".into(), "b/".into()],
                dest: "/dest/".into(),
                chown: Some("1:1".into()),
                chmod: None
            }
        );
        assert!(
            matches!(&ins[6].kind, Kind::Copy { add: true, sources, .. } if sources == &["x y.tar"])
        );
        assert_eq!(
            ins[9].kind,
            Kind::Expose(vec!["8080/tcp".into(), "9090".into()])
        );
        assert!(
            matches!(&ins[10].kind, Kind::Healthcheck(Some(Command::Shell(s))) if s.starts_with("wget"))
        );
        assert_eq!(
            ins[11].kind,
            Kind::Cmd(Command::Exec(vec![
                "sh".into(),
                "-c".into(),
                "httpd -f".into()
            ]))
        );
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("FROM scratch\n\nVOLUME /data\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("VOLUME"), "{e}");
        let e = parse("FROM scratch\nFETCH x\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("FETCH"), "{e}");
        let e = parse("FROM a\nFROM b\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("multi-stage"), "{e}");
        let e = parse("RUN true\n").unwrap_err().to_string();
        assert!(e.contains("FROM"), "{e}");
        let e = parse("FROM a\nRUN --mount=type=cache,target=/x true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("--mount"), "{e}");
        let e = parse("FROM a\nRUN <<EOF\necho\nEOF\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("heredoc"), "{e}");
        assert!(parse("FROM a\nENV 1X=2\n").is_err());
    }

    #[test]
    fn substitutes_variables() {
        let look = |n: &str| match n {
            "A" => Some("alpha".to_string()),
            "E" => Some(String::new()),
            _ => None,
        };
        assert_eq!(
            substitute("$A/${A}-${B:-dflt}-${A:+set}-${B:+x}-\\$A-$-$E.", &look),
            "alpha/alpha-dflt-set--$A-$-."
        );
        assert_eq!(substitute("${E:-empty}", &look), "empty");
    }
}
