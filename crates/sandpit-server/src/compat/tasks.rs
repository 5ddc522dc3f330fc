//! Setup steps and tasks from the workspace's `.codesandbox/tasks.json`, for the agent
//! gateway's `setup/*` and `task/*`.
//!
//! Setup runs once per boot, started by the first client that joins: one shell (id
//! [`SETUP_SHELL`]) runs the steps in order and records each exit code under
//! [`SETUP_DIR`] (in `/dev/shm`, so memory: kept by hibernation, gone after a clean boot, when
//! setup runs again). Tasks with `runAtStart` start with it. A task runs in a shell whose id is
//! derived from the task id, so every client finds it.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::rest::WORKSPACE_PATH;
use super::shells::{self, ShellMeta};
use sandpit_control::agent::{AgentClient, AgentFailure};

/// Where per-boot state lives (memory).
pub const BOOT_DIR: &str = "/dev/shm/.sandpit-csb";
/// Per-step exit codes of this boot's setup.
pub const SETUP_DIR: &str = "/dev/shm/.sandpit-csb/setup";
/// The shell that runs setup.
pub const SETUP_SHELL: &str = "setup";

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Config {
    #[serde(default, rename = "setupTasks")]
    pub setup_tasks: Vec<SetupTask>,
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SetupTask {
    Command(String),
    Full {
        name: Option<String>,
        command: String,
    },
}

impl SetupTask {
    pub fn command(&self) -> &str {
        match self {
            SetupTask::Command(c) | SetupTask::Full { command: c, .. } => c,
        }
    }
    pub fn name(&self) -> &str {
        match self {
            SetupTask::Full { name: Some(n), .. } => n,
            other => other.command(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskDef {
    pub name: Option<String>,
    pub command: String,
    #[serde(default, rename = "runAtStart")]
    pub run_at_start: bool,
    #[serde(default)]
    pub preview: Option<serde_json::Value>,
}

/// Largest `tasks.json` read (it is parsed in the server's memory).
pub const MAX_TASKS_FILE: u64 = 1 << 20;

/// The config, and why it could not be read (`validationErrors`). No file: empty config. A
/// file larger than [`MAX_TASKS_FILE`] or not a regular file is refused (as a validation
/// error), never read whole.
pub async fn load(agent: &AgentClient) -> Result<(Config, Vec<String>), AgentFailure> {
    let path = format!("{WORKSPACE_PATH}/.codesandbox/tasks.json");
    let bytes = match agent.read_bounded(&path, 0, MAX_TASKS_FILE + 1).await {
        Ok((info, _)) if info.size > MAX_TASKS_FILE => {
            return Ok((
                Config::default(),
                vec![format!("{path} is larger than {MAX_TASKS_FILE} bytes")],
            ));
        }
        Ok((_, bytes)) if bytes.len() as u64 > MAX_TASKS_FILE => {
            return Ok((
                Config::default(),
                vec![format!("{path} is larger than {MAX_TASKS_FILE} bytes")],
            ));
        }
        Ok((_, bytes)) => bytes,
        Err(AgentFailure::Refused(e))
            if e.code == sandpit_agent_proto::AgentErrorCode::NotRegularFile =>
        {
            return Ok((Config::default(), vec![e.message]));
        }
        Err(AgentFailure::Refused(_)) => return Ok((Config::default(), Vec::new())),
        Err(e) => return Err(e),
    };
    Ok(match serde_json::from_slice::<Config>(&bytes) {
        Ok(c) => (c, Vec::new()),
        Err(e) => (Config::default(), vec![format!("{path}: {e}")]),
    })
}

/// The shell id of a task: `task-` and the task id in hex (task ids are free text).
pub fn shell_id(task_id: &str) -> String {
    let hex: String = task_id
        .bytes()
        .take(48)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("task-{hex}")
}

/// `text` as one single-quoted shell word.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The setup shell's script: every step in order, each exit code recorded.
pub fn setup_script(steps: &[SetupTask]) -> String {
    let mut s = String::new();
    for (i, step) in steps.iter().enumerate() {
        s.push_str(&format!(
            "echo {}; sh -c {}; echo $? > {SETUP_DIR}/{i}.tmp; mv {SETUP_DIR}/{i}.tmp {SETUP_DIR}/{i}\n",
            quote(&format!("> {}", step.name())),
            quote(step.command()),
        ));
    }
    s
}

/// Start a task's shell (a fresh one if it ended).
pub async fn start_task(
    agent: &AgentClient,
    id: &str,
    def: &TaskDef,
) -> Result<bool, AgentFailure> {
    let sid = shell_id(id);
    if let Some(s) = shells::state(agent, &sid).await?
        && !s.exited
    {
        return Ok(true);
    }
    shells::terminate(agent, &sid).await?;
    let meta = ShellMeta {
        id: sid,
        name: def.name.clone().unwrap_or_else(|| id.to_string()),
        shell_type: "COMMAND".into(),
        command: def.command.clone(),
        owner: "root".into(),
        is_system: false,
        pty: false,
    };
    shells::start(agent, &meta, WORKSPACE_PATH).await
}

/// First join of a boot: forget the shells of an earlier boot (their processes are gone),
/// then (once: `mkdir` is the claim) start setup and the `runAtStart` tasks.
pub async fn on_join(agent: &AgentClient) -> Result<(), AgentFailure> {
    let claim = format!(
        "[ -e {BOOT_DIR} ] || {{ rm -rf {dir}; mkdir -p {BOOT_DIR}; }}; mkdir {SETUP_DIR} 2>/dev/null",
        dir = shells::SHELLS_DIR
    );
    if !shells::script(agent, &claim).await? {
        return Ok(()); // another client started this boot's setup
    }
    let (config, _) = load(agent).await?;
    if !config.setup_tasks.is_empty() {
        let meta = ShellMeta {
            id: SETUP_SHELL.into(),
            name: "Setup".into(),
            shell_type: "COMMAND".into(),
            command: setup_script(&config.setup_tasks),
            owner: "root".into(),
            is_system: true,
            pty: false,
        };
        shells::start(agent, &meta, WORKSPACE_PATH).await?;
    }
    for (id, def) in config.tasks.iter().filter(|(_, d)| d.run_at_start) {
        start_task(agent, id, def).await?;
    }
    Ok(())
}

/// Setup progress: `None` when there are no setup steps.
pub struct Progress {
    pub finished: bool,
    /// Per step: its name, command and exit code once it ran.
    pub steps: Vec<(String, String, Option<i32>)>,
}

pub async fn progress(agent: &AgentClient) -> Result<Option<Progress>, AgentFailure> {
    let (config, _) = load(agent).await?;
    if config.setup_tasks.is_empty() {
        return Ok(None);
    }
    let codes = shells::read_codes(agent, SETUP_DIR).await?;
    let steps: Vec<(String, String, Option<i32>)> = config
        .setup_tasks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                s.name().to_string(),
                s.command().to_string(),
                codes.get(&i.to_string()).copied(),
            )
        })
        .collect();
    let finished = steps.iter().all(|s| s.2.is_some());
    Ok(Some(Progress { finished, steps }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_both_setup_shapes() {
        let c: Config = serde_json::from_str(
            r#"{"setupTasks":["npm i",{"name":"Build","command":"make"}],
                "tasks":{"dev":{"name":"Dev","command":"npm run dev","runAtStart":true,"preview":{"port":3000}}}}"#,
        )
        .unwrap();
        assert_eq!(c.setup_tasks[0].name(), "npm i");
        assert_eq!(c.setup_tasks[1].name(), "Build");
        assert!(c.tasks["dev"].run_at_start);
        let script = setup_script(&c.setup_tasks);
        assert!(script.contains("sh -c 'make'") && script.contains("/1.tmp"));
        assert_eq!(shell_id("a b"), "task-612062");
    }
}
