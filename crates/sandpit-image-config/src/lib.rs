//! The image configuration a template carries: what an OCI image config's `config` object
//! holds that matters to a sandbox, plus the ready check of a build.

use serde::{Deserialize, Serialize};

/// Environment, working directory, user, start command and ports of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=VALUE` pairs in order; later ones replace earlier ones of the same key.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadyCheck>,
}

/// When a template's start command counts as ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyCheck {
    /// A TCP port is listening inside the sandbox.
    Port(u16),
    /// A shell command exits 0.
    Command(String),
}

impl ImageConfig {
    /// Parse the `config` object of an OCI/Docker image configuration blob.
    pub fn from_oci_config(json: &str) -> ImageConfig {
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        let c = &v["config"];
        let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
        };
        let mut cfg = ImageConfig {
            workdir: c["WorkingDir"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(String::from),
            user: c["User"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(String::from),
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            ..Default::default()
        };
        for kv in strings(&c["Env"]).unwrap_or_default() {
            if let Some((k, v)) = kv.split_once('=') {
                cfg.set_env(k, v);
            }
        }
        if let Some(ports) = c["ExposedPorts"].as_object() {
            for p in ports.keys() {
                if let Some(n) = p.split('/').next().and_then(|n| n.parse().ok()) {
                    cfg.exposed_ports.push(n);
                }
            }
            cfg.exposed_ports.sort_unstable();
        }
        cfg
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    pub fn get_env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The start command: `ENTRYPOINT` followed by `CMD` (Docker's rule), if any.
    pub fn start_command(&self) -> Option<Vec<String>> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        (!argv.is_empty()).then_some(argv)
    }
}

/// Quote `argv` for `/bin/sh -c`.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_oci_config() {
        let cfg = ImageConfig::from_oci_config(
            r#"{"config":{"Env":["PATH=/bin","A=b=c"],"Cmd":["sh"],"Entrypoint":["/init"],
                "WorkingDir":"/app","User":"","ExposedPorts":{"8080/tcp":{},"53/udp":{}}}}"#,
        );
        assert_eq!(cfg.get_env("A"), Some("b=c"));
        assert_eq!(cfg.workdir.as_deref(), Some("/app"));
        assert_eq!(cfg.user, None);
        assert_eq!(cfg.exposed_ports, vec![53, 8080]);
        assert_eq!(cfg.start_command().unwrap(), vec!["/init", "sh"]);
        assert_eq!(ImageConfig::from_oci_config("{}"), ImageConfig::default());
    }

    #[test]
    fn quotes_for_the_shell() {
        let argv: Vec<String> = ["echo", "it's", "a b", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(shell_join(&argv), r#"echo 'it'\''s' 'a b' ''"#);
    }
}
