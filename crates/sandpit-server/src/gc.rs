//! Garbage collection of a node's image files: layers and build cache entries that no
//! template version, sandbox or snapshot references (`sandpit_image::gc` removes them), and
//! the directories (boot snapshots, build logs) of deleted template versions that nothing
//! uses. Run by the server on a schedule ([`spawn`]) and by `sandpit gc`.
//!
//! Order is what makes it safe: the collection lease first (no build runs or starts
//! until it ends), then one read of what the database references, then removal. A version
//! deleted less than `min_age` ago still counts as referenced (a create that found it just
//! before may still be starting), and layers and cache entries younger than `min_age` stay.
#![expect(
    clippy::disallowed_methods,
    reason = "per-template directories under the data dir are the server's own; removed through sandpit_fs"
)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandpit_control::ControlError;
use sandpit_control::store::Store;
use sandpit_image::LayerStore;
use sandpit_image::gc::Collected;
use sandpit_image::store::LayerId;

use crate::server::Server;
use crate::util::now_ms;

/// How often the server collects, and the `min_age` it uses.
pub const INTERVAL: Duration = Duration::from_secs(3600);
pub const MIN_AGE: Duration = Duration::from_secs(3600);

/// What one collection did.
#[derive(Debug, Default)]
pub struct Report {
    /// `Some(why)`: nothing was collected (a build was under way).
    pub skipped: Option<&'static str>,
    pub images: Collected,
    /// Deleted template versions whose directories went, and their bytes.
    pub template_dirs: Vec<(String, u64)>,
}

impl Report {
    pub fn bytes(&self) -> u64 {
        self.images.bytes() + self.template_dirs.iter().map(|(_, b)| b).sum::<u64>()
    }
}

/// Collect once. `dry_run`: remove nothing, report what would go.
pub async fn collect(
    store: &Store,
    images: &LayerStore,
    data_dir: &Path,
    min_age: Duration,
    dry_run: bool,
) -> Result<Report, ControlError> {
    let image_error = |e: sandpit_image::ImageError| {
        ControlError::Internal(format!(
            "garbage collection: {}",
            sandpit_control::DisplayChain(&e)
        ))
    };
    let Some(lease) = images.try_gc_lease().map_err(image_error)? else {
        return Ok(Report {
            skipped: Some("a template build is under way"),
            ..Report::default()
        });
    };
    let cutoff = now_ms().saturating_sub(i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX));
    let mut referenced: HashSet<LayerId> = HashSet::new();
    for json in store.templates.layers_in_use(cutoff).await? {
        let layers: Vec<std::path::PathBuf> =
            sandpit_control::error::decode(|| "a template's layers".to_string(), &json)?;
        referenced.extend(layers.iter().filter_map(|l| LayerStore::layer_id_of(l)));
    }
    let deleted = store.templates.deleted_unused(cutoff).await?;
    let (images, data_dir) = (images.clone(), data_dir.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let collected = images
            .collect(&lease, &referenced, min_age, dry_run)
            .map_err(image_error)?;
        let mut template_dirs = Vec::new();
        for id in deleted {
            // Ids are ours (`tpl_<hex>`); anything else is not a directory name to trust.
            if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                continue;
            }
            let dir = data_dir.join("templates").join(&id);
            if !dir.is_dir() {
                continue;
            }
            let bytes = sandpit_image::gc::disk_usage(&dir);
            if !dry_run && let Err(e) = sandpit_fs::remove_tree(&dir) {
                tracing::warn!(template = %id, error = %e, "removing a deleted template's directory");
                continue;
            }
            template_dirs.push((id, bytes));
        }
        drop(lease);
        Ok(Report {
            skipped: None,
            images: collected,
            template_dirs,
        })
    })
    .await
    .map_err(|e| ControlError::Internal(format!("garbage collection task: {e}")))?
}

/// Collect every [`INTERVAL`] (the first one [`INTERVAL`] after start) until `shutdown`.
pub fn spawn(server: &Arc<Server>) -> tokio::task::JoinHandle<()> {
    let server = server.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + INTERVAL, INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = server.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match collect(
                &server.store,
                &server.images,
                &server.cfg.data_dir,
                MIN_AGE,
                false,
            )
            .await
            {
                Ok(r) if r.skipped.is_some() => {
                    tracing::info!(why = r.skipped, "garbage collection skipped")
                }
                Ok(r) => tracing::info!(
                    layers = r.images.layers.len(),
                    cache_entries = r.images.cache_entries,
                    template_dirs = r.template_dirs.len(),
                    bytes = r.bytes(),
                    "garbage collection"
                ),
                Err(e) => {
                    tracing::warn!(error = %sandpit_control::DisplayChain(&e), "garbage collection failed")
                }
            }
        }
    })
}
