//! Placement: which node a sandbox goes to at create, wake and fork when Sandpit runs on many
//! nodes (DESIGN §7). Pure: no I/O, no clock, no store, no async; given the same fleet, the
//! same request and the same random generator it makes the same choice.
//!
//! The decision is best-of-K, as E2B's orchestrator does it (best-of-3) and as "the power of
//! two choices" argues: a few random nodes, scored, instead of the whole fleet sorted.
//!
//! - **Eligible**: a node may take a request when it is not draining, has not refused this
//!   request already (`Want::exclude`), has a free slot and the memory asked for, and runs
//!   the runsc build a memory image needs (`Want::same_build`, a requirement). The choice is
//!   always eligible; [`NoPlacement`] is returned exactly when no node is.
//! - **Candidates**: the nodes that hold the image (up to [`LOCAL_MAX`], drawn at random when
//!   more do), likewise the nodes that cache the template's layers, the origin node
//!   (`Want::prefer_node`), and `k` eligible nodes drawn at random. When random draws keep
//!   landing on ineligible nodes (a nearly full fleet, a rare build) one O(n) filter replaces
//!   them, so a sparse fleet still finds its last free node. `k >= nodes.len()` scores every
//!   eligible node: the full scan best-of-K approximates.
//! - **Score**: headroom after placing, the mean of the free memory fraction and the free
//!   slot fraction (0 to 1), plus [`IMAGE_BONUS`] when the node holds the image,
//!   [`TEMPLATE_BONUS`] when it caches the template and [`ORIGIN_BONUS`] for the origin node.
//!   The highest score wins (the first candidate on a tie): a node holding the image wins
//!   unless its headroom is more than `IMAGE_BONUS` below another candidate's.
//!
//! Two entry points share that logic. [`choose`] over a slice looks the request's ids up in
//! every node's sets: one pass, at 1,000 nodes about 10 µs when the sets hold only the ids
//! asked for (what a per-request query of the holders returns) and about 50 µs when every
//! node brings hundreds of ids. [`Fleet`] indexes the holders once per refresh of the
//! figures (about 20 ms for 1,000 nodes holding 350 ids each), then a decision costs O(k),
//! about 1 µs, whatever the fleet's size (except for the sparse-fleet filter). Both give the
//! same answer for the same inputs and generator state. (Release-build medians from
//! `sandpit-bench --only-placement`, where a full scan takes 14 µs over a `Fleet`.)
//!
//! Placement is advice, not admission: two replicas deciding at once may pick the same node,
//! and the node's own admission (slots, memory) refuses what it cannot take; the caller then
//! asks again with that node in `Want::exclude`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use rand::Rng;

/// The `k` of best-of-K that E2B's orchestrator uses and Sandpit's callers should default to.
pub const DEFAULT_K: usize = 3;

/// Score added when a node holds the image (hibernation image or snapshot) a request wakes or
/// forks from: moving an image from object storage costs seconds, so this outweighs 30
/// points of headroom.
pub const IMAGE_BONUS: f64 = 0.3;

/// Score added when a node caches the layers of the request's template.
pub const TEMPLATE_BONUS: f64 = 0.1;

/// Score added for the origin node (`Want::prefer_node`): a tie-breaker, below any locality.
pub const ORIGIN_BONUS: f64 = 0.02;

/// At most this many image holders, and this many template holders, are candidates besides
/// the `k` random nodes (drawn at random among the holders when more hold it), so a template
/// cached on every node does not turn a decision into a scan.
pub const LOCAL_MAX: usize = 8;

/// A set of ids (template ids, image or snapshot ids) a node holds. Kept as the ids' 64-bit
/// hashes in a sorted vector beside the ids, so a lookup is a binary search over contiguous
/// integers and one string comparison on a hit (a node with hundreds of ids stays fast to
/// search even when 1,000 of them are searched per decision); exact despite hash collisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdSet {
    /// Each id's [`id_hash`], ascending.
    hashes: Vec<u64>,
    /// The ids in the order of `hashes` (by id among equal hashes), without duplicates.
    ids: Vec<String>,
}

impl IdSet {
    /// An empty set.
    pub fn new() -> IdSet {
        IdSet::default()
    }

    /// Whether `id` is in the set (O(log n)).
    pub fn contains(&self, id: &str) -> bool {
        self.contains_hashed(id_hash(id), id)
    }

    /// Adds `id`; false when it was there already. O(n): build large sets with
    /// [`FromIterator`] instead.
    pub fn insert(&mut self, id: impl Into<String>) -> bool {
        let id = id.into();
        let hash = id_hash(&id);
        let mut at = self.hashes.partition_point(|&h| h < hash);
        while at < self.hashes.len() && self.hashes[at] == hash {
            match self.ids[at].cmp(&id) {
                std::cmp::Ordering::Equal => return false,
                std::cmp::Ordering::Less => at += 1,
                std::cmp::Ordering::Greater => break,
            }
        }
        self.hashes.insert(at, hash);
        self.ids.insert(at, id);
        true
    }

    /// How many ids the set holds.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The ids, in an order that depends only on the set's contents (not sorted by id).
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().map(String::as_str)
    }

    /// [`IdSet::contains`] with the id's hash computed once by the caller.
    fn contains_hashed(&self, hash: u64, id: &str) -> bool {
        let start = self.hashes.partition_point(|&h| h < hash);
        self.hashes[start..]
            .iter()
            .take_while(|&&h| h == hash)
            .zip(&self.ids[start..])
            .any(|(_, held)| held == id)
    }
}

impl<S: Into<String>> FromIterator<S> for IdSet {
    /// Collects ids in any order, with or without duplicates (O(n log n)).
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> IdSet {
        let mut entries: Vec<(u64, String)> = iter
            .into_iter()
            .map(|id| {
                let id = id.into();
                (id_hash(&id), id)
            })
            .collect();
        entries.sort_unstable();
        entries.dedup();
        let (hashes, ids) = entries.into_iter().unzip();
        IdSet { hashes, ids }
    }
}

/// The hash an [`IdSet`] and a [`Fleet`] file an id under: std's SipHash with fixed keys, so
/// the same in every run of one build (decisions stay reproducible).
fn id_hash(id: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    id.hash(&mut hasher);
    hasher.finish()
}

/// One live node as the placer sees it: its load and what it holds locally. The caller builds
/// it from the node's lease row (only nodes whose lease is current are live) and its latest
/// heartbeat; free figures above their totals count as the totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeLoad {
    /// The node's id (unique in a fleet: with duplicates, `prefer_node` names the first).
    pub id: String,
    /// Memory not yet promised to sandboxes, MiB.
    pub free_memory_mib: u64,
    /// Memory the node gives to sandboxes in all, MiB.
    pub total_memory_mib: u64,
    /// Sandbox slots free (network slots, the per-node sandbox limit).
    pub free_slots: u32,
    /// Sandbox slots in all.
    pub total_slots: u32,
    /// The node is draining: it takes nothing new.
    pub draining: bool,
    /// The node's runsc build (a memory image restores only under the build that wrote it).
    pub runsc_build: String,
    /// Templates whose layers the node caches.
    pub templates: IdSet,
    /// Hibernation images and snapshots the node holds on its own disk.
    pub images: IdSet,
}

impl NodeLoad {
    /// Whether this node may take `want`: not draining, not excluded, a free slot, the
    /// memory, and the build when `want.same_build` names one.
    pub fn admits(&self, want: &Want<'_>) -> bool {
        !self.draining
            && self.free_slots >= 1
            && self.free_memory_mib >= want.memory_mib
            && want.same_build.is_none_or(|b| b == self.runsc_build)
            && !want.exclude.contains(&self.id)
    }

    /// Counts one more sandbox of `memory_mib` against this node, as its admission will
    /// (saturating: never below zero), so later decisions over the same figures see it.
    pub fn take(&mut self, memory_mib: u64) {
        self.free_memory_mib = self.free_memory_mib.saturating_sub(memory_mib);
        self.free_slots = self.free_slots.saturating_sub(1);
    }

    /// Headroom after placing `memory_mib` here: the mean of the free memory fraction and the
    /// free slot fraction, each from 0 (full) to 1 (empty).
    pub fn headroom(&self, memory_mib: u64) -> f64 {
        let memory = fraction(
            self.free_memory_mib.saturating_sub(memory_mib),
            self.total_memory_mib,
        );
        let slots = fraction(
            u64::from(self.free_slots.saturating_sub(1)),
            u64::from(self.total_slots),
        );
        (memory + slots) / 2.0
    }
}

/// What a sandbox needs from its node. `Want::default()` is "any node with a free slot".
#[derive(Clone, Copy, Debug, Default)]
pub struct Want<'a> {
    /// Memory the sandbox is promised, MiB.
    pub memory_mib: u64,
    /// The template it is created from (locality: nodes caching its layers score higher).
    pub template_id: Option<&'a str>,
    /// The hibernation image or snapshot it wakes or forks from (locality: nodes holding it
    /// score higher).
    pub image_id: Option<&'a str>,
    /// A requirement, not a preference: only nodes running this runsc build are eligible
    /// (a memory image restores only under the build that wrote it). When the answer is
    /// [`NoPlacement::NoSameBuild`] and the image also has files to boot from, the caller
    /// may ask again with `None` and boot from the files (losing the processes' memory).
    pub same_build: Option<&'a str>,
    /// The origin node (where the sandbox last ran): a small bonus, a tie-breaker.
    pub prefer_node: Option<&'a str>,
    /// Nodes that already refused this request: never chosen.
    pub exclude: &'a [String],
}

/// How much of what the request needs the chosen node already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Locality {
    /// Neither the image nor the template's layers (or the request names neither).
    None,
    /// The template's layers, not the image.
    Template,
    /// The image (whether or not it also caches the template).
    Image,
}

impl Locality {
    /// A stable lowercase name for logs and metrics: `none`, `template`, `image`.
    pub fn as_str(self) -> &'static str {
        match self {
            Locality::None => "none",
            Locality::Template => "template",
            Locality::Image => "image",
        }
    }
}

/// The chosen node and why, for the caller to act on and to log or measure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The node's index in the slice given to [`choose`] (or in [`Fleet::nodes`]).
    pub index: usize,
    /// The node's id.
    pub node_id: String,
    /// What the node holds of what the request needs.
    pub locality: Locality,
    /// The node is the origin node the request preferred.
    pub origin: bool,
    /// How many distinct eligible nodes were scored.
    pub candidates: usize,
    /// The decision looked at every node (`k` at least the fleet's size, or too few random
    /// draws were eligible): worth counting, it means the fleet is nearly full or the build
    /// rare.
    pub scanned: bool,
}

/// Why no node can take a request. The caller answers 503 with [`NoPlacement::code`] (and,
/// for `NoSameBuild`, may first retry without the build requirement, see [`Want`]).
///
/// The reason is the first of these filters, applied in this order, that leaves no node:
/// live, not draining, not excluded, a free slot, the memory, the build. So `NoSameBuild`
/// means nodes with room exist but none runs the build: booting from files would fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoPlacement {
    /// The fleet is empty: no node holds a current lease.
    #[error("no live node")]
    NoLiveNode,
    /// Every live node is draining.
    #[error("every live node is draining")]
    AllDraining,
    /// Every node that is not draining already refused this request.
    #[error("every node that is not draining refused this request")]
    AllRefused,
    /// No node that may take work has a free slot.
    #[error("no node has a free slot")]
    NoFreeSlot,
    /// Nodes have free slots but none has the memory asked for.
    #[error("no node has {wanted_mib} MiB free (the most free is {largest_free_mib} MiB)")]
    NoMemory {
        /// What the request asked for.
        wanted_mib: u64,
        /// The most any node with a free slot has free.
        largest_free_mib: u64,
    },
    /// Nodes have room but none runs the runsc build the memory image needs.
    #[error("no node with room runs the runsc build the memory image needs")]
    NoSameBuild,
}

impl NoPlacement {
    /// A stable machine-readable code for the API's 503 body.
    pub fn code(&self) -> &'static str {
        match self {
            NoPlacement::NoLiveNode => "no_live_node",
            NoPlacement::AllDraining => "all_nodes_draining",
            NoPlacement::AllRefused => "all_nodes_refused",
            NoPlacement::NoFreeSlot => "no_free_slot",
            NoPlacement::NoMemory { .. } => "no_node_with_memory",
            NoPlacement::NoSameBuild => "no_node_with_build",
        }
    }
}

/// Chooses a node for `want` among `nodes` by best-of-`k` (see the module docs; `k` of 0
/// counts as 1, `k >= nodes.len()` scores every eligible node). One pass over `nodes` finds
/// the holders of the image and template and the origin node when the request names them:
/// give it sets holding only the ids asked for, or use a [`Fleet`] for many decisions over
/// the same figures.
///
/// The choice always [admits](NodeLoad::admits) `want`; the error is returned exactly when no
/// node does. Deterministic given `rng`'s state.
pub fn choose<R: Rng + ?Sized>(
    nodes: &[NodeLoad],
    want: &Want<'_>,
    k: usize,
    rng: &mut R,
) -> Result<Placement, NoPlacement> {
    let image_key = want.image_id.map(|id| (id_hash(id), id));
    let template_key = want.template_id.map(|id| (id_hash(id), id));
    let mut image = Vec::new();
    let mut template = Vec::new();
    let mut origin = None;
    if image_key.is_some() || template_key.is_some() || want.prefer_node.is_some() {
        for (i, node) in nodes.iter().enumerate() {
            if let Some((hash, id)) = image_key
                && node.images.contains_hashed(hash, id)
            {
                image.push(i);
            }
            if let Some((hash, id)) = template_key
                && node.templates.contains_hashed(hash, id)
            {
                template.push(i);
            }
            if origin.is_none() && want.prefer_node == Some(node.id.as_str()) {
                origin = Some(i);
            }
        }
    }
    let holders = Holders {
        image: &image,
        template: &template,
        origin,
    };
    decide(nodes, want, k, rng, &holders)
}

/// A snapshot of the fleet with its holders indexed (image and template ids to the nodes
/// holding them, node id to index), so that each decision costs O(k) rather than a pass
/// over every node's sets. Build one when the fleet's figures are refreshed (building sorts
/// one entry per id held: tens of milliseconds for 1,000 nodes holding hundreds each, see
/// `sandpit-bench --only-placement`) and [record](Fleet::record) each placement made from
/// it until the next refresh.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    nodes: Vec<NodeLoad>,
    /// Node id to its first index.
    by_id: HashMap<String, usize>,
    /// Who holds each image.
    images: HolderIndex,
    /// Who caches each template.
    templates: HolderIndex,
}

impl Fleet {
    /// Indexes `nodes` (their order is kept: indices in placements refer to it).
    pub fn new(nodes: Vec<NodeLoad>) -> Fleet {
        let mut by_id = HashMap::with_capacity(nodes.len());
        for (i, node) in nodes.iter().enumerate() {
            by_id.entry(node.id.clone()).or_insert(i);
        }
        Fleet {
            images: HolderIndex::new(&nodes, images_of),
            templates: HolderIndex::new(&nodes, templates_of),
            nodes,
            by_id,
        }
    }

    /// The nodes, in the order given to [`Fleet::new`], with the placements recorded since.
    pub fn nodes(&self) -> &[NodeLoad] {
        &self.nodes
    }

    /// The same decision as [`choose`] over [`Fleet::nodes`] (the same answer for the same
    /// generator state), without a pass over the fleet.
    pub fn choose<R: Rng + ?Sized>(
        &self,
        want: &Want<'_>,
        k: usize,
        rng: &mut R,
    ) -> Result<Placement, NoPlacement> {
        let image = want.image_id.map_or(Cow::Borrowed(&[][..]), |id| {
            self.images.holders(&self.nodes, images_of, id)
        });
        let template = want.template_id.map_or(Cow::Borrowed(&[][..]), |id| {
            self.templates.holders(&self.nodes, templates_of, id)
        });
        let origin = want.prefer_node.and_then(|id| self.by_id.get(id).copied());
        let holders = Holders {
            image: &image,
            template: &template,
            origin,
        };
        decide(&self.nodes, want, k, rng, &holders)
    }

    /// Counts a placement made from this fleet against its node ([`NodeLoad::take`]).
    /// A placement whose index is out of range (made from another fleet) changes nothing.
    pub fn record(&mut self, placement: &Placement, memory_mib: u64) {
        if let Some(node) = self.nodes.get_mut(placement.index) {
            node.take(memory_mib);
        }
    }
}

fn images_of(node: &NodeLoad) -> &IdSet {
    &node.images
}

fn templates_of(node: &NodeLoad) -> &IdSet {
    &node.templates
}

/// Who holds each id of one kind: one (id hash, node index) entry per id held, sorted, in two
/// parallel vectors, so the holders of an id are one contiguous, ascending run of `nodes`.
/// Sorting integers builds it several times faster than a map from id strings would; a
/// directory on the hashes' top bits (about one bucket per entry) makes a lookup one or two
/// cache misses instead of a binary search over the whole index.
#[derive(Clone, Debug, Default)]
struct HolderIndex {
    hashes: Vec<u64>,
    nodes: Vec<usize>,
    /// Shift that leaves a hash's top bits, its bucket in `starts`.
    shift: u32,
    /// Where each bucket's entries start in `hashes`, plus the end (empty when no entries).
    starts: Vec<usize>,
    /// Hashes that two different ids share (sorted): their runs are checked id by id.
    collided: Vec<u64>,
}

impl HolderIndex {
    fn new(nodes: &[NodeLoad], set: fn(&NodeLoad) -> &IdSet) -> HolderIndex {
        let held = nodes.iter().map(|n| set(n).len()).sum();
        // (hash, node, position of the id in the node's set)
        let mut entries: Vec<(u64, usize, usize)> = Vec::with_capacity(held);
        for (i, node) in nodes.iter().enumerate() {
            let hashes = &set(node).hashes;
            entries.extend(hashes.iter().enumerate().map(|(at, &h)| (h, i, at)));
        }
        entries.sort_unstable_by_key(|&(h, node, _)| (h, node));
        let mut collided = Vec::new();
        for pair in entries.windows(2) {
            let ((h1, n1, at1), (h2, n2, at2)) = (pair[0], pair[1]);
            if h1 == h2
                && set(&nodes[n1]).ids[at1] != set(&nodes[n2]).ids[at2]
                && collided.last() != Some(&h1)
            {
                collided.push(h1);
            }
        }
        let hashes: Vec<u64> = entries.iter().map(|e| e.0).collect();
        // One or two entries per bucket (at most 2^20 buckets: 8 MiB of directory).
        let bits = (usize::BITS - hashes.len().leading_zeros())
            .saturating_sub(1)
            .min(20);
        let shift = 64 - bits;
        let mut starts = Vec::new();
        if !hashes.is_empty() {
            starts.reserve((1 << bits) + 1);
            let mut at = 0;
            for bucket in 0..=(1usize << bits) {
                while at < hashes.len() && bucket_of(hashes[at], shift) < bucket {
                    at += 1;
                }
                starts.push(at);
            }
        }
        HolderIndex {
            nodes: entries.iter().map(|e| e.1).collect(),
            hashes,
            shift,
            starts,
            collided,
        }
    }

    /// The nodes holding `id`, ascending: a slice of the index, or (when another id shares
    /// its hash) the run filtered through each node's set.
    fn holders<'i>(
        &'i self,
        nodes: &[NodeLoad],
        set: fn(&NodeLoad) -> &IdSet,
        id: &str,
    ) -> Cow<'i, [usize]> {
        let hash = id_hash(id);
        let bucket = bucket_of(hash, self.shift);
        let (Some(&from), Some(&to)) = (self.starts.get(bucket), self.starts.get(bucket + 1))
        else {
            return Cow::Borrowed(&[]);
        };
        let start = from + self.hashes[from..to].partition_point(|&h| h < hash);
        let len = self.hashes[start..to].partition_point(|&h| h == hash);
        let run = &self.nodes[start..start + len];
        if self.collided.binary_search(&hash).is_err() {
            return Cow::Borrowed(run);
        }
        let mut exact: Vec<usize> = run
            .iter()
            .copied()
            .filter(|&i| set(&nodes[i]).contains_hashed(hash, id))
            .collect();
        exact.dedup();
        Cow::Owned(exact)
    }
}

/// A hash's bucket in a [`HolderIndex`] directory: its top `64 - shift` bits (0 when none).
fn bucket_of(hash: u64, shift: u32) -> usize {
    hash.checked_shr(shift).map_or(0, |b| b as usize)
}

/// The nodes that hold what a request needs, as ascending indices into the fleet.
struct Holders<'h> {
    image: &'h [usize],
    template: &'h [usize],
    origin: Option<usize>,
}

impl Holders<'_> {
    fn locality(&self, node: usize) -> Locality {
        if self.image.binary_search(&node).is_ok() {
            Locality::Image
        } else if self.template.binary_search(&node).is_ok() {
            Locality::Template
        } else {
            Locality::None
        }
    }

    fn score(&self, nodes: &[NodeLoad], want: &Want<'_>, node: usize) -> f64 {
        let mut score = nodes[node].headroom(want.memory_mib);
        if self.image.binary_search(&node).is_ok() {
            score += IMAGE_BONUS;
        }
        if self.template.binary_search(&node).is_ok() {
            score += TEMPLATE_BONUS;
        }
        if self.origin == Some(node) {
            score += ORIGIN_BONUS;
        }
        score
    }
}

/// The shared decision: gather candidates, score them, explain a failure.
fn decide<R: Rng + ?Sized>(
    nodes: &[NodeLoad],
    want: &Want<'_>,
    k: usize,
    rng: &mut R,
    holders: &Holders<'_>,
) -> Result<Placement, NoPlacement> {
    let k = k.max(1);
    let mut candidates: Vec<usize> = Vec::new();
    let mut scanned = false;
    if k >= nodes.len() {
        candidates.extend((0..nodes.len()).filter(|&i| nodes[i].admits(want)));
        scanned = true;
    } else {
        // Below the fleet's size, so neither this nor the draws below overflow.
        candidates.reserve(k + 2 * LOCAL_MAX + 1);
        add_holders(nodes, want, holders.image, &mut candidates, rng);
        add_holders(nodes, want, holders.template, &mut candidates, rng);
        if let Some(origin) = holders.origin
            && nodes[origin].admits(want)
            && !candidates.contains(&origin)
        {
            candidates.push(origin);
        }
        // `k` distinct eligible nodes by rejection: O(k) while most nodes are eligible.
        let mut drawn = 0;
        for _ in 0..4 * k + 4 {
            if drawn == k {
                break;
            }
            let i = rng.random_range(0..nodes.len());
            if nodes[i].admits(want) && !candidates.contains(&i) {
                candidates.push(i);
                drawn += 1;
            }
        }
        if drawn < k {
            // Most draws missed: draw the rest from the eligible nodes themselves.
            scanned = true;
            let pool: Vec<usize> = (0..nodes.len())
                .filter(|&i| nodes[i].admits(want) && !candidates.contains(&i))
                .collect();
            let more = (k - drawn).min(pool.len());
            for j in rand::seq::index::sample(rng, pool.len(), more) {
                candidates.push(pool[j]);
            }
        }
    }
    let mut chosen = None;
    for &i in &candidates {
        let score = holders.score(nodes, want, i);
        if chosen.is_none_or(|(_, best)| score > best) {
            chosen = Some((i, score));
        }
    }
    let Some((index, _)) = chosen else {
        return Err(why_not(nodes, want));
    };
    Ok(Placement {
        index,
        node_id: nodes[index].id.clone(),
        locality: holders.locality(index),
        origin: holders.origin == Some(index),
        candidates: candidates.len(),
        scanned,
    })
}

/// Up to [`LOCAL_MAX`] eligible holders: all of them when few hold it, else random draws.
fn add_holders<R: Rng + ?Sized>(
    nodes: &[NodeLoad],
    want: &Want<'_>,
    holders: &[usize],
    candidates: &mut Vec<usize>,
    rng: &mut R,
) {
    let mut consider = |i: usize| {
        if nodes[i].admits(want) && !candidates.contains(&i) {
            candidates.push(i);
        }
    };
    if holders.len() <= LOCAL_MAX {
        holders.iter().copied().for_each(&mut consider);
    } else {
        for _ in 0..LOCAL_MAX {
            consider(holders[rng.random_range(0..holders.len())]);
        }
    }
}

/// The first filter, in the documented order, that leaves no node (called when none admits
/// `want`).
fn why_not(nodes: &[NodeLoad], want: &Want<'_>) -> NoPlacement {
    if nodes.is_empty() {
        return NoPlacement::NoLiveNode;
    }
    let mut left = nodes.iter().filter(|n| !n.draining).peekable();
    if left.peek().is_none() {
        return NoPlacement::AllDraining;
    }
    let mut left = left.filter(|n| !want.exclude.contains(&n.id)).peekable();
    if left.peek().is_none() {
        return NoPlacement::AllRefused;
    }
    let with_slot: Vec<&NodeLoad> = left.filter(|n| n.free_slots >= 1).collect();
    let Some(largest_free_mib) = with_slot.iter().map(|n| n.free_memory_mib).max() else {
        return NoPlacement::NoFreeSlot;
    };
    if largest_free_mib < want.memory_mib {
        return NoPlacement::NoMemory {
            wanted_mib: want.memory_mib,
            largest_free_mib,
        };
    }
    NoPlacement::NoSameBuild
}

fn fraction(free: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        free.min(total) as f64 / total as f64
    }
}

#[cfg(test)]
mod tests;
