//! `sandpit gc`: remove the layers, build cache entries and deleted templates' directories
//! that no template version, sandbox or snapshot references (the server does the same every
//! hour). Works on the data dir and database directly, like `sandpit nodes`; safe while the
//! server runs (it skips when a build is under way; see `sandpit_server::gc`).
#![expect(clippy::disallowed_methods, reason = "the operator's data dir")]

use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct GcArgs {
    /// The data dir whose images to collect (and whose SQLite database to read when no
    /// --database is given).
    #[arg(long, env = "SANDPIT_DATA_DIR", default_value = "./.sandpit")]
    data_dir: PathBuf,
    /// The database (`postgres://…` or `sqlite://…`), as given to `serve`.
    #[arg(long, env = "SANDPIT_DATABASE")]
    database: Option<String>,
    /// Keep what is younger than this (layers, cache entries, versions deleted since):
    /// a failed build's steps stay cached, a create racing a delete still finds its layers.
    #[arg(long, default_value = "1h", value_parser = parse_age)]
    min_age: Duration,
    /// Print what would go; remove nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_age(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    sandpit_api_types::parse_duration(s)
}

pub async fn run(args: GcArgs) -> anyhow::Result<u8> {
    let store = super::nodes::open_db(&args.data_dir, args.database.as_deref()).await?;
    let images_dir = args.data_dir.join("images");
    anyhow::ensure!(
        images_dir.is_dir(),
        "no image store at {} (give --data-dir as to `sandpit serve`)",
        images_dir.display()
    );
    let images = sandpit_image::LayerStore::open(&images_dir)
        .map_err(|e| anyhow::anyhow!("{}", sandpit_control::DisplayChain(&e)))?;
    let report =
        sandpit_server::gc::collect(&store, &images, &args.data_dir, args.min_age, args.dry_run)
            .await
            .map_err(|e| anyhow::anyhow!("{}", sandpit_control::DisplayChain(&e)))?;
    if let Some(why) = report.skipped {
        eprintln!("nothing collected: {why}; try again when it ends");
        return Ok(1);
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for (id, bytes) in &report.images.layers {
        println!("{verb} layer {} ({})", id.as_str(), human(*bytes));
    }
    for (id, bytes) in &report.template_dirs {
        println!("{verb} template dir {id} ({})", human(*bytes));
    }
    println!(
        "{verb} {} layer(s), {} cache entr{}, {} template dir(s): {} freed; kept {} layer(s)",
        report.images.layers.len(),
        report.images.cache_entries,
        if report.images.cache_entries == 1 {
            "y"
        } else {
            "ies"
        },
        report.template_dirs.len(),
        human(report.bytes()),
        report.images.kept,
    );
    Ok(0)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
