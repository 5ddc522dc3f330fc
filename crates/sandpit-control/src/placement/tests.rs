//! Tests of placement: the reasons of an impossible placement, locality, the spread over
//! equal nodes, properties over random fleets, and a 1,000-node fleet filling up.

use std::time::Instant;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn node(id: &str, free_mib: u64, free_slots: u32) -> NodeLoad {
    NodeLoad {
        id: id.into(),
        free_memory_mib: free_mib,
        total_memory_mib: 8192,
        free_slots,
        total_slots: 16,
        draining: false,
        runsc_build: "b1".into(),
        templates: IdSet::new(),
        images: IdSet::new(),
    }
}

/// `n` identical half-empty nodes `n0`..`n{n-1}`.
fn equal_nodes(n: usize) -> Vec<NodeLoad> {
    (0..n).map(|i| node(&format!("n{i}"), 4096, 8)).collect()
}

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn want(memory_mib: u64) -> Want<'static> {
    Want {
        memory_mib,
        ..Want::default()
    }
}

/// What the module documents, written out as plainly as possible: `None` when some node
/// admits the request, else the first filter that leaves no node.
fn expected_reason(nodes: &[NodeLoad], want: &Want<'_>) -> Option<NoPlacement> {
    if nodes.iter().any(|n| n.admits(want)) {
        return None;
    }
    let live: Vec<_> = nodes.iter().collect();
    let undrained: Vec<_> = live.iter().filter(|n| !n.draining).collect();
    let willing: Vec<_> = undrained
        .iter()
        .filter(|n| !want.exclude.contains(&n.id))
        .collect();
    let slotted: Vec<_> = willing.iter().filter(|n| n.free_slots > 0).collect();
    let roomy: Vec<_> = slotted
        .iter()
        .filter(|n| n.free_memory_mib >= want.memory_mib)
        .collect();
    Some(if live.is_empty() {
        NoPlacement::NoLiveNode
    } else if undrained.is_empty() {
        NoPlacement::AllDraining
    } else if willing.is_empty() {
        NoPlacement::AllRefused
    } else if slotted.is_empty() {
        NoPlacement::NoFreeSlot
    } else if roomy.is_empty() {
        NoPlacement::NoMemory {
            wanted_mib: want.memory_mib,
            largest_free_mib: slotted.iter().map(|n| n.free_memory_mib).max().unwrap_or(0),
        }
    } else {
        NoPlacement::NoSameBuild
    })
}

#[test]
fn an_empty_fleet_has_no_live_node() {
    let err = choose(&[], &want(0), DEFAULT_K, &mut rng(1)).unwrap_err();
    assert_eq!(err, NoPlacement::NoLiveNode);
    assert_eq!(err.code(), "no_live_node");
    assert_eq!(
        Fleet::new(Vec::new()).choose(&want(0), DEFAULT_K, &mut rng(1)),
        Err(NoPlacement::NoLiveNode)
    );
}

#[test]
fn an_all_draining_fleet_says_so() {
    let mut nodes = equal_nodes(50);
    for n in &mut nodes {
        n.draining = true;
    }
    assert_eq!(
        choose(&nodes, &want(512), DEFAULT_K, &mut rng(1)),
        Err(NoPlacement::AllDraining)
    );
}

#[test]
fn draining_and_refused_nodes_are_all_refused() {
    let mut nodes = equal_nodes(4);
    nodes[0].draining = true;
    let refused: Vec<String> = vec!["n1".into(), "n2".into(), "n3".into()];
    let w = Want {
        exclude: &refused,
        ..want(512)
    };
    assert_eq!(
        choose(&nodes, &w, DEFAULT_K, &mut rng(1)),
        Err(NoPlacement::AllRefused)
    );
}

#[test]
fn a_full_fleet_has_no_free_slot() {
    let nodes: Vec<_> = (0..20).map(|i| node(&format!("n{i}"), 8192, 0)).collect();
    let err = choose(&nodes, &want(1), DEFAULT_K, &mut rng(1)).unwrap_err();
    assert_eq!(err, NoPlacement::NoFreeSlot);
}

#[test]
fn too_much_memory_names_the_largest_free() {
    let mut nodes = equal_nodes(20);
    nodes[7].free_memory_mib = 6000;
    // The largest free among nodes with a slot: a slotless node with more does not count.
    nodes[8].free_memory_mib = 7000;
    nodes[8].free_slots = 0;
    let err = choose(&nodes, &want(6500), DEFAULT_K, &mut rng(1)).unwrap_err();
    assert_eq!(
        err,
        NoPlacement::NoMemory {
            wanted_mib: 6500,
            largest_free_mib: 6000
        }
    );
    assert_eq!(err.code(), "no_node_with_memory");
    assert_eq!(
        choose(&nodes, &want(6000), 3, &mut rng(1)).unwrap().index,
        7
    );
}

#[test]
fn a_missing_build_is_no_same_build_and_files_still_fit() {
    let nodes = equal_nodes(30);
    let w = Want {
        image_id: Some("img"),
        same_build: Some("b2"),
        ..want(512)
    };
    assert_eq!(
        choose(&nodes, &w, DEFAULT_K, &mut rng(1)),
        Err(NoPlacement::NoSameBuild)
    );
    // What the caller does when the image has files: ask again without the requirement.
    let files = Want {
        same_build: None,
        ..w
    };
    assert!(choose(&nodes, &files, DEFAULT_K, &mut rng(1)).is_ok());
}

#[test]
fn the_build_requirement_finds_the_one_node_with_it() {
    let mut nodes = equal_nodes(1000);
    nodes[613].runsc_build = "b2".into();
    let w = Want {
        same_build: Some("b2"),
        ..want(512)
    };
    let p = choose(&nodes, &w, DEFAULT_K, &mut rng(3)).unwrap();
    assert_eq!(p.index, 613);
    assert!(
        p.scanned,
        "one node in 1,000: the random draws miss, the filter finds it"
    );
}

#[test]
fn the_image_holder_wins_when_loads_are_equal() {
    for seed in 0..200 {
        let mut nodes = equal_nodes(100);
        let holder = (seed as usize * 37) % 100;
        nodes[holder].images.insert("img");
        nodes[(holder + 1) % 100].templates.insert("tpl");
        let w = Want {
            image_id: Some("img"),
            template_id: Some("tpl"),
            ..want(512)
        };
        let p = choose(&nodes, &w, DEFAULT_K, &mut rng(seed)).unwrap();
        assert_eq!((p.index, p.locality), (holder, Locality::Image));
        let q = Fleet::new(nodes)
            .choose(&w, DEFAULT_K, &mut rng(seed))
            .unwrap();
        assert_eq!(p, q);
    }
}

#[test]
fn the_template_holder_wins_over_a_plain_node() {
    for seed in 0..200 {
        let mut nodes = equal_nodes(100);
        let holder = (seed as usize * 13) % 100;
        nodes[holder].templates.insert("tpl");
        let w = Want {
            template_id: Some("tpl"),
            image_id: Some("nobody-has-it"),
            ..want(512)
        };
        let p = choose(&nodes, &w, DEFAULT_K, &mut rng(seed)).unwrap();
        assert_eq!((p.index, p.locality), (holder, Locality::Template));
    }
}

#[test]
fn the_origin_node_breaks_a_tie() {
    let nodes = equal_nodes(100);
    for seed in 0..100 {
        let w = Want {
            prefer_node: Some("n42"),
            ..want(512)
        };
        let p = choose(&nodes, &w, DEFAULT_K, &mut rng(seed)).unwrap();
        assert_eq!((p.node_id.as_str(), p.origin), ("n42", true));
        assert_eq!(p.locality, Locality::None);
    }
}

#[test]
fn a_much_fuller_image_holder_loses() {
    let mut nodes = equal_nodes(100);
    // 1 slot and 512 MiB left of 16 and 8 GiB: headroom 0 after placing, against ~0.47.
    nodes[5].images.insert("img");
    nodes[5].free_slots = 1;
    nodes[5].free_memory_mib = 512;
    let w = Want {
        image_id: Some("img"),
        ..want(512)
    };
    for seed in 0..100 {
        let p = choose(&nodes, &w, DEFAULT_K, &mut rng(seed)).unwrap();
        assert_ne!(p.index, 5);
        assert_eq!(p.locality, Locality::None);
    }
    // Slightly fuller (headroom 0.41 against 0.47): the image still wins.
    nodes[5].free_slots = 7;
    nodes[5].free_memory_mib = 3584;
    let p = choose(&nodes, &w, DEFAULT_K, &mut rng(1)).unwrap();
    assert_eq!(p.index, 5);
}

#[test]
fn a_template_on_every_node_keeps_the_candidates_bounded() {
    let mut nodes = equal_nodes(1000);
    for n in &mut nodes {
        n.templates.insert("base");
    }
    let w = Want {
        template_id: Some("base"),
        ..want(512)
    };
    let fleet = Fleet::new(nodes);
    for seed in 0..50 {
        let p = fleet.choose(&w, DEFAULT_K, &mut rng(seed)).unwrap();
        assert!(p.candidates <= LOCAL_MAX + DEFAULT_K, "{p:?}");
        assert!(!p.scanned);
        assert_eq!(p.locality, Locality::Template);
    }
}

#[test]
fn the_last_free_node_of_a_full_fleet_is_found() {
    let mut nodes: Vec<_> = (0..1000).map(|i| node(&format!("n{i}"), 8192, 0)).collect();
    nodes[999].free_slots = 1;
    let p = Fleet::new(nodes)
        .choose(&want(512), DEFAULT_K, &mut rng(9))
        .unwrap();
    assert_eq!((p.index, p.scanned, p.candidates), (999, true, 1));
}

#[test]
fn k_at_least_the_fleet_scores_every_eligible_node() {
    let mut nodes = equal_nodes(10);
    nodes[3].free_slots = 12;
    nodes[6].draining = true;
    nodes[6].free_slots = 16;
    let p = choose(&nodes, &want(512), usize::MAX, &mut rng(1)).unwrap();
    assert_eq!((p.index, p.candidates, p.scanned), (3, 9, true));
}

#[test]
fn the_same_generator_state_makes_the_same_choice() {
    let nodes = equal_nodes(500);
    let a: Vec<_> = (0..20)
        .map(|_| choose(&nodes, &want(64), 3, &mut rng(77)).unwrap())
        .collect();
    assert!(a.windows(2).all(|w| w[0] == w[1]));
    let mut r = rng(78);
    let spread: std::collections::HashSet<_> = (0..20)
        .map(|_| choose(&nodes, &want(64), 3, &mut r).unwrap().index)
        .collect();
    assert!(
        spread.len() > 10,
        "one generator advancing picks different nodes"
    );
}

#[test]
fn equal_nodes_share_placements_evenly() {
    // Without recording, equal scores leave the first random draw: uniform over 10 nodes.
    // 1,000 placements: each count is Binomial(1000, 0.1), mean 100, sd 9.5; [55, 145] is
    // beyond 4.5 sd on both sides.
    let nodes = equal_nodes(10);
    let mut r = rng(2024);
    let mut counts = [0u32; 10];
    for _ in 0..1000 {
        counts[choose(&nodes, &want(512), DEFAULT_K, &mut r).unwrap().index] += 1;
    }
    assert!(counts.iter().all(|c| (55..=145).contains(c)), "{counts:?}");

    // Recording each placement, best-of-3 evens the load out much more tightly.
    let mut fleet = Fleet::new(
        (0..10)
            .map(|i| NodeLoad {
                free_memory_mib: 1 << 20,
                total_memory_mib: 1 << 20,
                free_slots: 200,
                total_slots: 200,
                ..node(&format!("n{i}"), 0, 0)
            })
            .collect(),
    );
    for _ in 0..1000 {
        let p = fleet.choose(&want(512), DEFAULT_K, &mut r).unwrap();
        fleet.record(&p, 512);
    }
    let used: Vec<u32> = fleet.nodes().iter().map(|n| 200 - n.free_slots).collect();
    assert_eq!(used.iter().sum::<u32>(), 1000);
    assert!(used.iter().all(|u| (85..=115).contains(u)), "{used:?}");
}

/// Random fleets small enough that every filter matters: few slots, a little memory, three
/// builds, ids shared between nodes, some draining.
fn fleets() -> impl Strategy<Value = Vec<NodeLoad>> {
    let one = (
        0u64..=8,
        1u64..=8,
        0u32..=3,
        1u32..=4,
        prop::bool::weighted(0.2),
        0u8..3,
        prop::collection::vec(0u8..3, 0..3),
        prop::collection::vec(0u8..3, 0..3),
    );
    prop::collection::vec(one, 0..40).prop_map(|nodes| {
        nodes
            .into_iter()
            .enumerate()
            .map(
                |(i, (free, total, slots, total_slots, draining, build, tpls, imgs))| NodeLoad {
                    id: format!("n{i}"),
                    free_memory_mib: free * 512,
                    total_memory_mib: total * 512,
                    free_slots: slots,
                    total_slots,
                    draining,
                    runsc_build: format!("b{build}"),
                    templates: tpls.iter().map(|t| format!("t{t}")).collect(),
                    images: imgs.iter().map(|m| format!("i{m}")).collect(),
                },
            )
            .collect()
    })
}

/// A request over the ids `fleets` uses, plus ids no node has (`t3`, `i3`, `b3`, `n45`).
#[derive(Clone, Debug)]
struct Ask {
    memory_mib: u64,
    template: Option<String>,
    image: Option<String>,
    build: Option<String>,
    prefer: Option<String>,
    exclude: Vec<String>,
    k: usize,
    seed: u64,
}

impl Ask {
    fn want(&self) -> Want<'_> {
        Want {
            memory_mib: self.memory_mib,
            template_id: self.template.as_deref(),
            image_id: self.image.as_deref(),
            same_build: self.build.as_deref(),
            prefer_node: self.prefer.as_deref(),
            exclude: &self.exclude,
        }
    }
}

fn asks() -> impl Strategy<Value = Ask> {
    (
        0u64..=9,
        prop::option::of(0u8..4),
        prop::option::of(0u8..4),
        prop::option::of(0u8..4),
        prop::option::of(0u8..46),
        prop::collection::vec(0u8..46, 0..6),
        0usize..6,
        any::<u64>(),
    )
        .prop_map(|(mem, t, i, b, p, ex, k, seed)| Ask {
            memory_mib: mem * 512,
            template: t.map(|t| format!("t{t}")),
            image: i.map(|i| format!("i{i}")),
            build: b.map(|b| format!("b{b}")),
            prefer: p.map(|p| format!("n{p}")),
            exclude: ex.iter().map(|n| format!("n{n}")).collect(),
            k,
            seed,
        })
}

proptest! {
    /// The choice always admits the request, an error comes exactly when no node does and
    /// names the documented reason, and the fleet index decides as the slice pass does.
    #[test]
    fn the_choice_is_eligible_and_an_error_means_none_is(nodes in fleets(), ask in asks()) {
        let want = ask.want();
        let got = choose(&nodes, &want, ask.k, &mut rng(ask.seed));
        match (&got, expected_reason(&nodes, &want)) {
            (Ok(p), None) => {
                let chosen = &nodes[p.index];
                prop_assert!(chosen.admits(&want), "{p:?} {chosen:?}");
                prop_assert_eq!(&p.node_id, &chosen.id);
                prop_assert!(p.candidates >= 1);
                let holds_image = want.image_id.is_some_and(|i| chosen.images.contains(i));
                let holds_template = want.template_id.is_some_and(|t| chosen.templates.contains(t));
                prop_assert_eq!(p.locality == Locality::Image, holds_image);
                prop_assert_eq!(
                    p.locality == Locality::Template,
                    holds_template && !holds_image
                );
                let first = nodes.iter().position(|n| Some(n.id.as_str()) == want.prefer_node);
                prop_assert_eq!(p.origin, first == Some(p.index));
            }
            (Err(e), Some(reason)) => prop_assert_eq!(*e, reason),
            (got, reason) => prop_assert!(false, "got {:?}, expected failure {:?}", got, reason),
        }
        let fleet = Fleet::new(nodes.clone());
        prop_assert_eq!(fleet.choose(&want, ask.k, &mut rng(ask.seed)), got);
    }

    /// With `k` at least the fleet's size, the choice is the best-scoring eligible node.
    #[test]
    fn a_full_scan_picks_the_best_score(nodes in fleets(), ask in asks()) {
        let want = ask.want();
        let score = |n: &NodeLoad| {
            let mut s = n.headroom(want.memory_mib);
            if want.image_id.is_some_and(|i| n.images.contains(i)) { s += IMAGE_BONUS; }
            if want.template_id.is_some_and(|t| n.templates.contains(t)) { s += TEMPLATE_BONUS; }
            if want.prefer_node == Some(n.id.as_str()) { s += ORIGIN_BONUS; }
            s
        };
        if let Ok(p) = choose(&nodes, &want, nodes.len(), &mut rng(ask.seed)) {
            let best = nodes.iter().filter(|n| n.admits(&want)).map(score).fold(f64::MIN, f64::max);
            prop_assert_eq!(score(&nodes[p.index]), best);
            prop_assert_eq!(p.candidates, nodes.iter().filter(|n| n.admits(&want)).count());
        }
    }

    /// Among equal nodes, the one holding the image is chosen, whatever `k`, the fleet's
    /// size and the generator.
    #[test]
    fn locality_wins_when_loads_are_equal(n in 1usize..300, at in any::<prop::sample::Index>(), k in 1usize..6, seed in any::<u64>()) {
        let mut nodes = equal_nodes(n);
        let holder = at.index(n);
        nodes[holder].images.insert("img");
        let w = Want { image_id: Some("img"), ..want(512) };
        let p = choose(&nodes, &w, k, &mut rng(seed)).unwrap();
        prop_assert_eq!((p.index, p.locality), (holder, Locality::Image));
    }
}

/// A fleet like a large deployment's: 1,000 nodes, a tenth on the next runsc build, a few
/// draining, each caching 50 of 500 templates and holding 300 images of its own.
fn big_fleet(r: &mut StdRng) -> Vec<NodeLoad> {
    (0..1000)
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
                    .collect(),
                images: (0..300).map(|j| format!("img-{i:04}-{j:03}")).collect(),
            }
        })
        .collect()
}

#[test]
fn a_thousand_nodes_take_a_hundred_thousand_placements() {
    let mut r = rng(15);
    let nodes = big_fleet(&mut r);
    let initial = nodes.clone();
    let built = Instant::now();
    let mut fleet = Fleet::new(nodes);
    let build_time = built.elapsed();
    let mut used_mib = vec![0u64; initial.len()];
    let mut used_slots = vec![0u32; initial.len()];
    let (mut placed, mut refused, mut image_hits, mut image_asks, mut fallbacks, mut scans) =
        (0u32, 0u32, 0u32, 0u32, 0u32, 0u32);
    let mut spent = std::time::Duration::ZERO;
    let mut reasons: std::collections::BTreeMap<&str, u32> = Default::default();
    for round in 0..100_000u32 {
        // 40% creates from a template, 30% wakes (same build required, from the origin),
        // 30% forks from a snapshot held by one node.
        let memory_mib = [256, 512, 1024, 2048][r.random_range(0..4)];
        let template = format!("tpl-{:03}", r.random_range(0..500));
        let origin = r.random_range(0..initial.len());
        let image = format!("img-{origin:04}-{:03}", r.random_range(0..300));
        let kind = round % 10;
        let mut want = Want {
            memory_mib,
            template_id: Some(&template),
            ..Want::default()
        };
        if kind >= 4 {
            want.image_id = Some(&image);
            want.prefer_node = Some(&initial[origin].id);
            image_asks += 1;
        }
        if kind >= 7 {
            want.same_build = Some(&initial[origin].runsc_build);
        }
        let t = Instant::now();
        let mut got = fleet.choose(&want, DEFAULT_K, &mut r);
        if got == Err(NoPlacement::NoSameBuild) {
            // The caller's fallback when the image has files.
            fallbacks += 1;
            want.same_build = None;
            got = fleet.choose(&want, DEFAULT_K, &mut r);
        }
        spent += t.elapsed();
        match got {
            Ok(p) => {
                assert!(fleet.nodes()[p.index].admits(&want), "{p:?}");
                used_mib[p.index] += memory_mib;
                used_slots[p.index] += 1;
                image_hits += u32::from(p.locality == Locality::Image);
                scans += u32::from(p.scanned);
                fleet.record(&p, memory_mib);
                placed += 1;
            }
            Err(e) => {
                assert_eq!(Some(e), expected_reason(fleet.nodes(), &want));
                *reasons.entry(e.code()).or_default() += 1;
                refused += 1;
            }
        }
    }
    for (i, n) in initial.iter().enumerate() {
        assert!(used_mib[i] <= n.free_memory_mib, "{} over-filled", n.id);
        assert!(used_slots[i] <= n.free_slots, "{} over-filled", n.id);
        let now = &fleet.nodes()[i];
        assert_eq!(now.free_memory_mib, n.free_memory_mib - used_mib[i]);
        assert_eq!(now.free_slots, n.free_slots - used_slots[i]);
        if n.draining {
            assert_eq!(used_slots[i], 0, "{} is draining", n.id);
        }
    }
    assert_eq!(placed + refused, 100_000);
    assert!(image_hits > image_asks / 2, "{image_hits} of {image_asks}");
    eprintln!(
        "1,000 nodes: Fleet::new {build_time:?}; {:.2} µs per decision (best-of-{DEFAULT_K}); \
         {placed} placed, {refused} refused {reasons:?}, {image_hits}/{image_asks} image hits, \
         {fallbacks} same-build fallbacks, {scans} scans",
        spent.as_secs_f64() * 1e6 / 100_000.0
    );
}

#[test]
fn one_pass_over_a_thousand_nodes_decides_as_the_fleet_does() {
    // The slice entry point against the index on a large fleet, timed for comparison (fewer
    // rounds: each is a pass; a fresh generator per decision, as each pair must match).
    let mut r = rng(16);
    let mut nodes = big_fleet(&mut r);
    let mut fleet = Fleet::new(nodes.clone());
    let (mut slice_time, mut fleet_time, mut scan_time) = Default::default();
    for _ in 0..500 {
        let template = format!("tpl-{:03}", r.random_range(0..500));
        let origin = r.random_range(0..nodes.len());
        let image = format!("img-{origin:04}-{:03}", r.random_range(0..300));
        let want = Want {
            memory_mib: 1024,
            template_id: Some(&template),
            image_id: Some(&image),
            prefer_node: Some(&nodes[origin].id),
            ..Want::default()
        };
        let seed: u64 = r.random();
        let t = Instant::now();
        let a = choose(&nodes, &want, DEFAULT_K, &mut rng(seed)).unwrap();
        slice_time += t.elapsed();
        let t = Instant::now();
        let b = fleet.choose(&want, DEFAULT_K, &mut rng(seed)).unwrap();
        fleet_time += t.elapsed();
        let t = Instant::now();
        let c = fleet.choose(&want, usize::MAX, &mut rng(seed)).unwrap();
        scan_time += t.elapsed();
        assert_eq!(a, b);
        assert!(c.scanned && c.candidates > 900, "{c:?}");
        nodes[a.index].take(1024);
        fleet.record(&b, 1024);
    }
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / 500.0;
    eprintln!(
        "1,000 nodes, per decision: Fleet best-of-3 {:.2} µs, slice best-of-3 {:.2} µs, \
         full scan {:.2} µs",
        per(fleet_time),
        per(slice_time),
        per(scan_time)
    );
}

proptest! {
    /// An id set holds exactly the distinct ids put in, built at once or one by one.
    #[test]
    fn an_id_set_holds_exactly_what_was_put_in(
        ids in prop::collection::vec("[a-c]{0,3}", 0..30),
        probe in "[a-c]{0,3}",
    ) {
        let built: IdSet = ids.iter().cloned().collect();
        let mut inserted = IdSet::new();
        for id in &ids {
            let fresh = !inserted.contains(id);
            prop_assert_eq!(inserted.insert(id.as_str()), fresh);
        }
        prop_assert_eq!(&built, &inserted);
        let distinct: std::collections::BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        prop_assert_eq!(built.len(), distinct.len());
        prop_assert_eq!(built.contains(&probe), distinct.contains(probe.as_str()));
        let listed: std::collections::BTreeSet<&str> = built.iter().collect();
        prop_assert_eq!(listed, distinct);
    }
}

#[test]
fn ids_sharing_a_hash_are_told_apart() {
    // No two real ids are known to share a 64-bit hash: file `x` on n0 under `y`'s hash.
    let hash = id_hash("y");
    let mut nodes = equal_nodes(40);
    nodes[0].images = IdSet {
        hashes: vec![hash],
        ids: vec!["x".into()],
    };
    nodes[1].images.insert("y");
    // n0 has more headroom: were it taken for a holder of `y`, it would win.
    nodes[0].free_slots = 16;
    assert!(!nodes[0].images.contains("y") && nodes[1].images.contains("y"));
    let fleet = Fleet::new(nodes.clone());
    assert_eq!(fleet.images.collided, vec![hash]);
    assert_eq!(
        fleet.images.holders(fleet.nodes(), images_of, "y").as_ref(),
        &[1]
    );
    let w = Want {
        image_id: Some("y"),
        ..want(512)
    };
    for seed in 0..20 {
        let p = fleet.choose(&w, DEFAULT_K, &mut rng(seed)).unwrap();
        assert_eq!((p.index, p.locality), (1, Locality::Image));
        assert_eq!(choose(&nodes, &w, DEFAULT_K, &mut rng(seed)).unwrap(), p);
    }
}
