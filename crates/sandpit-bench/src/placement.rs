//! Placement benchmarks: the time of one decision over 1,000 simulated nodes, best-of-3
//! against a full scan (every eligible node scored) in the same run: through a
//! `placement::Fleet` (indexed once), through a pass over a slice whose sets hold only the
//! ids asked for (what a caller gets from a per-request query of the holders), and through
//! a pass over a slice with every node's full sets (the slowest way). Needs no root and no
//! runsc (`sandpit-bench --only-placement`).
//!
//! The fleet fills up as it would: each placement is recorded against its node, so the run
//! goes from an empty fleet to a nearly full one (and through the sparse-fleet filter).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandpit_control::placement::{
    self, DEFAULT_K, Fleet, IdSet, Locality, NoPlacement, NodeLoad, Placement, Want,
};

use crate::{Row, percentile, row};

const NODES: usize = 1000;

/// 1,000 nodes: a quarter with 64 GiB, the rest 128 GiB, 110 slots each, one in ten on the
/// next runsc build, one in fifty draining; each caches 50 of 500 templates and holds 300
/// images of its own.
fn fleet(seed: u64) -> Vec<NodeLoad> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..NODES)
        .map(|i| {
            let total_memory_mib = if i % 4 == 0 { 64 << 10 } else { 128 << 10 };
            NodeLoad {
                id: format!("node-{i:04}"),
                free_memory_mib: total_memory_mib,
                total_memory_mib,
                free_slots: 110,
                total_slots: 110,
                draining: i % 50 == 7,
                runsc_build: if i % 10 == 3 { "b2" } else { "b1" }.into(),
                templates: (0..50)
                    .map(|_| format!("tpl-{:03}", r.random_range(0..500)))
                    .collect::<IdSet>(),
                images: (0..300).map(|j| format!("img-{i:04}-{j:03}")).collect(),
            }
        })
        .collect()
}

/// One request of the mix: 40% creates from a template, 30% wakes from an image on its
/// origin node (same runsc build required), 30% forks from a snapshot one node holds.
struct Ask {
    memory_mib: u64,
    template: String,
    image: Option<String>,
    origin: Option<usize>,
    same_build: bool,
}

fn asks(n: usize, seed: u64) -> Vec<Ask> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let kind = i % 10;
            let origin = r.random_range(0..NODES);
            Ask {
                memory_mib: [256, 512, 1024, 2048][r.random_range(0..4)],
                template: format!("tpl-{:03}", r.random_range(0..500)),
                image: (kind >= 4)
                    .then(|| format!("img-{origin:04}-{:03}", r.random_range(0..300))),
                origin: (kind >= 4).then_some(origin),
                same_build: kind >= 7,
            }
        })
        .collect()
}

/// What a run measured: each decision's time, and how good the choices were.
struct Run {
    times: Vec<Duration>,
    image_hits: usize,
    image_asks: usize,
    refused: usize,
    /// How many placements had been made when the first request found no node.
    first_refusal: Option<usize>,
}

/// Places every ask in turn with `decide`, the way a caller would (retrying without the
/// build when no node has it), recording each placement with `record`.
fn run(
    asks: &[Ask],
    ids: &[String],
    builds: &[String],
    mut decide: impl FnMut(&Want<'_>) -> (Result<Placement, NoPlacement>, Duration),
    mut record: impl FnMut(&Placement, u64),
) -> Run {
    let mut out = Run {
        times: Vec::with_capacity(asks.len()),
        image_hits: 0,
        image_asks: 0,
        refused: 0,
        first_refusal: None,
    };
    for (i, ask) in asks.iter().enumerate() {
        let mut want = Want {
            memory_mib: ask.memory_mib,
            template_id: Some(&ask.template),
            image_id: ask.image.as_deref(),
            prefer_node: ask.origin.map(|o| ids[o].as_str()),
            same_build: ask
                .origin
                .filter(|_| ask.same_build)
                .map(|o| builds[o].as_str()),
            exclude: &[],
        };
        let t = Instant::now();
        let (mut got, mut setup) = decide(&want);
        if got == Err(NoPlacement::NoSameBuild) {
            want.same_build = None;
            let (again, more) = decide(&want);
            got = again;
            setup += more;
        }
        out.times.push(t.elapsed().saturating_sub(setup));
        out.image_asks += usize::from(ask.image.is_some());
        match got {
            Ok(p) => {
                out.image_hits += usize::from(p.locality == Locality::Image);
                record(&p, ask.memory_mib);
            }
            Err(_) => {
                out.first_refusal.get_or_insert(i - out.refused);
                out.refused += 1;
            }
        }
    }
    out
}

fn fleet_run(asks: &[Ask], nodes: &[NodeLoad], k: usize) -> Run {
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let builds: Vec<String> = nodes.iter().map(|n| n.runsc_build.clone()).collect();
    let fleet = RefCell::new(Fleet::new(nodes.to_vec()));
    let mut rng = StdRng::seed_from_u64(7);
    run(
        asks,
        &ids,
        &builds,
        |want| (fleet.borrow().choose(want, k, &mut rng), Duration::ZERO),
        |p, mib| fleet.borrow_mut().record(p, mib),
    )
}

fn slice_run(asks: &[Ask], nodes: &[NodeLoad], k: usize) -> Run {
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let builds: Vec<String> = nodes.iter().map(|n| n.runsc_build.clone()).collect();
    let nodes = RefCell::new(nodes.to_vec());
    let mut rng = StdRng::seed_from_u64(7);
    run(
        asks,
        &ids,
        &builds,
        |want| {
            let got = placement::choose(&nodes.borrow(), want, k, &mut rng);
            (got, Duration::ZERO)
        },
        |p, mib| {
            if let Some(n) = nodes.borrow_mut().get_mut(p.index) {
                n.take(mib);
            }
        },
    )
}

/// A pass over nodes whose sets are empty but for the ids of the current request, filled
/// (outside the timing) from who holds what, as a per-request query would return it.
fn slim_run(asks: &[Ask], nodes: &[NodeLoad], k: usize) -> Run {
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let builds: Vec<String> = nodes.iter().map(|n| n.runsc_build.clone()).collect();
    let mut image_holders: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut template_holders: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for id in n.images.iter() {
            image_holders.entry(id).or_default().push(i);
        }
        for id in n.templates.iter() {
            template_holders.entry(id).or_default().push(i);
        }
    }
    let slim: Vec<NodeLoad> = nodes
        .iter()
        .map(|n| NodeLoad {
            templates: IdSet::new(),
            images: IdSet::new(),
            ..n.clone()
        })
        .collect();
    let slim = RefCell::new(slim);
    let mut rng = StdRng::seed_from_u64(7);
    let mut filled: Vec<usize> = Vec::new();
    run(
        asks,
        &ids,
        &builds,
        |want| {
            let mut nodes = slim.borrow_mut();
            for &i in &filled {
                nodes[i].images = IdSet::new();
                nodes[i].templates = IdSet::new();
            }
            filled.clear();
            let t = Instant::now();
            for (id, holders, images) in [
                (want.image_id, &image_holders, true),
                (want.template_id, &template_holders, false),
            ] {
                let Some(id) = id else { continue };
                for &i in holders.get(id).into_iter().flatten() {
                    if images {
                        nodes[i].images.insert(id);
                    } else {
                        nodes[i].templates.insert(id);
                    }
                    filled.push(i);
                }
            }
            let setup = t.elapsed();
            let got = placement::choose(&nodes, want, k, &mut rng);
            (got, setup)
        },
        |p, mib| {
            if let Some(n) = slim.borrow_mut().get_mut(p.index) {
                n.take(mib);
            }
        },
    )
}

fn us(samples: &[Duration], p: f64) -> f64 {
    percentile(samples, p) * 1000.0
}

fn compare(name: &str, best: &Run, scan: &Run, slots: usize) -> Row {
    let mut r = row(
        name,
        &best.times,
        Some(("full scan, same asks", &scan.times)),
        "p50 ≤ 39 µs (E2B: best-of-3, 50 nodes)",
    );
    r.p99_ms = Some(percentile(&best.times, 0.99));
    r.value = Some(us(&best.times, 0.5));
    let pct = |run: &Run| 100.0 * run.image_hits as f64 / run.image_asks.max(1) as f64;
    let first = |run: &Run| {
        run.first_refusal.map_or("none".into(), |n| {
            format!("at {:.1}% of slots", 100.0 * n as f64 / slots as f64)
        })
    };
    r.unit = Some(format!(
        "µs p50, p99 {:.1} µs (scan p50 {:.1}, p99 {:.1} µs); image hits {:.1}% (scan {:.1}%); \
         refused {} (scan {}), first {} (scan {})",
        us(&best.times, 0.99),
        us(&scan.times, 0.5),
        us(&scan.times, 0.99),
        pct(best),
        pct(scan),
        best.refused,
        scan.refused,
        first(best),
        first(scan),
    ));
    r
}

/// The placement rows: Fleet, slim slice and full slice, best-of-3 against a full scan, and
/// the cost of indexing the fleet. `quick` places 10,000 requests instead of 100,000 (the
/// full-slice row places a tenth as many: each decision searches every node's sets).
pub fn bench(quick: bool) -> Vec<Row> {
    let n = if quick { 10_000 } else { 100_000 };
    let nodes = fleet(1);
    let slots = nodes
        .iter()
        .filter(|n| !n.draining)
        .map(|n| n.total_slots as usize)
        .sum();
    let asks = asks(n, 2);
    let mut rows = Vec::new();

    let best = fleet_run(&asks, &nodes, DEFAULT_K);
    let scan = fleet_run(&asks, &nodes, usize::MAX);
    rows.push(compare(
        "place best-of-3: Fleet, 1k nodes",
        &best,
        &scan,
        slots,
    ));
    let best = slim_run(&asks, &nodes, DEFAULT_K);
    let scan = slim_run(&asks, &nodes, usize::MAX);
    rows.push(compare(
        "place best-of-3: slim, 1k nodes",
        &best,
        &scan,
        slots,
    ));
    let few = &asks[..n / 10];
    let best = slice_run(few, &nodes, DEFAULT_K);
    let scan = slice_run(few, &nodes, usize::MAX);
    rows.push(compare(
        "place best-of-3: full sets, 1k",
        &best,
        &scan,
        slots,
    ));

    let builds: Vec<Duration> = (0..5)
        .map(|_| {
            let copy = nodes.clone();
            let t = Instant::now();
            let fleet = Fleet::new(copy);
            let took = t.elapsed();
            drop(fleet);
            took
        })
        .collect();
    let mut r = row("Fleet::new, 1k nodes × 350 ids", &builds, None, "");
    r.unit = Some("index built once per refresh of the fleet's figures".into());
    rows.push(r);
    rows
}
