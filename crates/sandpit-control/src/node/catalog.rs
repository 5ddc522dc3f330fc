//! A workspace's templates as a catalog: the rules on names, versions and aliases, the
//! quotas on what a workspace keeps and builds, and deletion (refused while sandboxes use a
//! template, unless forced, which destroys them first).
//!
//! Building an existing name adds its next version (`name:N`); `name` means its highest
//! ready version, an alias the version it was pointed at. Deleting `name` deletes every
//! version; deleting `name:N`, an id or an alias deletes that one version.
//!
//! The build itself (pulling images over HTTP, running the steps) is the edge's job: it
//! checks here before it does any work, registers the template here, and reports the end
//! through the store.
#![expect(
    clippy::disallowed_methods,
    reason = "a deleted template's boot snapshot dir is the node's own, under the data dir"
)]

use std::sync::Arc;

use super::Node;
use super::boot::POOL_WORKSPACE;
use crate::error::ControlError;
use crate::store::{Sandbox, TemplateInsert, TemplateRef, TemplateRow, TemplateStatus};
use crate::util::now_ms;

/// Longest template name or alias part.
pub const MAX_NAME: usize = 64;

/// `1–64` characters of `[a-z0-9._-]`, starting with a letter or a digit.
pub fn valid_name(n: &str) -> bool {
    (1..=MAX_NAME).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && n.as_bytes()[0].is_ascii_alphanumeric()
}

/// A template's name, or 400 `invalid_name`.
pub fn check_name(name: &str) -> Result<(), ControlError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ControlError::invalid(
            "invalid_name",
            "name must be 1–64 characters [a-z0-9._-], starting with a letter or digit",
        ))
    }
}

/// Split and check `namespace@alias`, or 400 `invalid_alias`.
pub fn parse_alias(s: &str) -> Result<(&str, &str), ControlError> {
    match s.split_once('@') {
        Some((ns, a)) if valid_name(ns) && valid_name(a) => Ok((ns, a)),
        _ => Err(ControlError::invalid(
            "invalid_alias",
            format!("alias {s:?} must be namespace@alias, each 1–64 characters [a-z0-9._-]"),
        )),
    }
}

fn too_many_templates(max: u32) -> ControlError {
    ControlError::Kept {
        limit: "max_templates",
        value: max,
        what: "every version counts: delete templates or versions (name:N) this workspace no longer needs".into(),
    }
}

fn too_many_builds(max: u32) -> ControlError {
    ControlError::Underway {
        limit: "max_builds",
        value: max,
        what: "this workspace has that many template builds under way; retry when one ends".into(),
    }
}

/// Refuse early (before a build context is unpacked) a template the workspace's quotas
/// would refuse at [`register`] anyway. Not a reservation: [`register`] checks again in
/// the same transaction as its insert.
pub async fn check_quotas(node: &Node, workspace_id: &str) -> Result<(), ControlError> {
    let q = &node.cfg.quotas;
    let (templates, builds) = node.store.templates.count(workspace_id).await?;
    if q.max_templates > 0 && templates >= i64::from(q.max_templates) {
        return Err(too_many_templates(q.max_templates));
    }
    if q.max_builds > 0 && builds >= i64::from(q.max_builds) {
        return Err(too_many_builds(q.max_builds));
    }
    Ok(())
}

/// Record a new template version (its row as the build starts) within the workspace's
/// quotas: the next version of its name (1 for a new name). Numbered, checked and inserted
/// in one store transaction, so two requests (or two replicas) never both pass a quota nor
/// share a version. Returns the version. A built-in template's name is 409
/// `template_exists`.
pub async fn register(node: &Node, row: &TemplateRow) -> Result<u32, ControlError> {
    let q = &node.cfg.quotas;
    match node
        .store
        .templates
        .insert(row, q.max_templates, q.max_builds, &node.cfg.node_id)
        .await?
    {
        TemplateInsert::Inserted { version } => Ok(version),
        TemplateInsert::TooManyTemplates => Err(too_many_templates(q.max_templates)),
        TemplateInsert::TooManyBuilds => Err(too_many_builds(q.max_builds)),
        TemplateInsert::NameTaken => Err(ControlError::conflict(
            "template_exists",
            format!(
                "{:?} is a built-in template's name, or has {} versions",
                row.name,
                crate::store::MAX_VERSION
            ),
        )),
    }
}

/// A template the workspace sees (its own, or a built-in) by name, id or `namespace@alias`,
/// or 404 `template_not_found`.
pub async fn find(
    node: &Node,
    workspace_id: &str,
    name_or_id: &str,
) -> Result<TemplateRow, ControlError> {
    node.store
        .templates
        .find(workspace_id, name_or_id)
        .await?
        .ok_or_else(|| {
            ControlError::not_found("template_not_found", format!("no template {name_or_id:?}"))
        })
}

/// Delete a workspace's template: every version of it when `reference` is a plain name,
/// else the one version `name:N`, an id or an alias names. Refused (409 `template_in_use`)
/// while the workspace's sandboxes use a version about to go, unless `force`, which
/// destroys them first; refused while one builds and for built-in templates (nothing is
/// deleted then). Layers stay in the image store (other versions may share them) until
/// garbage collection finds them unreferenced; boot snapshots go now.
pub async fn delete(
    node: &Arc<Node>,
    workspace_id: &str,
    reference: &str,
    force: bool,
) -> Result<(), ControlError> {
    let t = find(node, workspace_id, reference).await?;
    if t.workspace_id.as_deref() != Some(workspace_id) {
        return Err(ControlError::Forbidden {
            code: "template_builtin",
            message: "built-in templates cannot be deleted".into(),
        });
    }
    let targets = if matches!(TemplateRef::parse(reference)?, TemplateRef::IdOrName(r) if r == t.name)
    {
        node.store.templates.versions(workspace_id, &t.name).await?
    } else {
        vec![t]
    };
    if targets.iter().any(|t| t.status == TemplateStatus::Building) {
        return Err(ControlError::conflict(
            "template_building",
            "a version of the template is being built; delete it when the build ends",
        ));
    }
    let mut sandboxes = Vec::new();
    for t in &targets {
        sandboxes.extend(node.store.templates.dependents(&t.id).await?.0);
    }
    let users: Vec<&Sandbox> = sandboxes
        .iter()
        .filter(|s| s.workspace_id != POOL_WORKSPACE)
        .collect();
    if !users.is_empty() && !force {
        return Err(ControlError::conflict(
            "template_in_use",
            format!(
                "{} sandbox(es) use this template ({}); destroy them or delete with force=true",
                users.len(),
                users
                    .iter()
                    .take(5)
                    .map(|s| s.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    for s in &sandboxes {
        super::lifecycle::destroy(node, &s.id).await?;
    }
    for t in &targets {
        node.store
            .templates
            .delete(workspace_id, &t.id, now_ms())
            .await?;
        let _ = std::fs::remove_dir_all(super::images::boot_snapshot_dir(node, &t.id));
    }
    Ok(())
}
