//! The harness's hit ratio on a slice of the Mooncake trace equals an offline LRU computed
//! here, independently of the harness: block identities come from the hash-id prefixes (not
//! from SHA-256 keys), and the cache is a plain LRU of `pool / page` pages with the node's
//! documented order of operations (a lookup refreshes the hit prefix; a save refreshes blocks
//! already held and reserves a page for each new one, evicting least recently used, and the new
//! pages become most recent once written).

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;

use pegaflow_scenarios::{run, Options, Scenario};

const REQUESTS: usize = 150;
const BLOCK: u64 = 32;
const HASH_BLOCK: u64 = 512;
const POOL_MIB: u64 = 24;
const PAGE: u64 = 4096;

/// The trace checked into `scenarios/traces/`.
fn trace() -> String {
    format!(
        "{}/traces/mooncake_conversation_trace.jsonl",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A block's identity: the hash ids up to its own (as a rolling hash) and its offset in them.
type Block = (u64, u64);

struct Lru {
    capacity: usize,
    tick: u64,
    at: HashMap<Block, u64>,
    order: BTreeMap<u64, Block>,
}

impl Lru {
    fn touch(&mut self, block: Block) -> bool {
        let Some(old) = self.at.get(&block).copied() else {
            return false;
        };
        self.order.remove(&old);
        self.tick += 1;
        self.at.insert(block, self.tick);
        self.order.insert(self.tick, block);
        true
    }

    fn insert(&mut self, block: Block) {
        self.tick += 1;
        self.at.insert(block, self.tick);
        self.order.insert(self.tick, block);
    }

    fn evict(&mut self) -> bool {
        match self.order.pop_first() {
            Some((_, block)) => {
                self.at.remove(&block);
                true
            }
            None => false,
        }
    }
}

fn blocks_of(line: &serde_json::Value) -> Vec<Block> {
    let ids: Vec<u64> = line["hash_ids"]
        .as_array()
        .expect("hash_ids")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect();
    let input = line["input_length"].as_u64().expect("input_length");
    let mut prefix = Vec::new();
    let mut hasher = DefaultHasher::new();
    for &id in &ids {
        id.hash(&mut hasher);
        prefix.push(hasher.finish());
    }
    (0..input / BLOCK)
        .map(|j| {
            (
                prefix[(j * BLOCK / HASH_BLOCK) as usize],
                j % (HASH_BLOCK / BLOCK),
            )
        })
        .collect()
}

/// `(looked up, hit)` blocks of the first `REQUESTS` requests, replayed one after another.
fn offline_lru() -> (u64, u64) {
    let path = trace();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let mut lru = Lru {
        capacity: (POOL_MIB << 20) as usize / PAGE as usize,
        tick: 0,
        at: HashMap::new(),
        order: BTreeMap::new(),
    };
    let (mut looked_up, mut hit) = (0u64, 0u64);
    for line in text.lines().take(REQUESTS) {
        let blocks = blocks_of(&serde_json::from_str(line).expect("json"));
        assert!(blocks.len() < lru.capacity, "a prompt must fit the pool");
        let hits = blocks.iter().take_while(|b| lru.at.contains_key(b)).count();
        for &b in &blocks[..hits] {
            lru.touch(b);
        }
        looked_up += blocks.len() as u64;
        hit += hits as u64;
        let mut pending: Vec<Block> = Vec::new();
        for &b in &blocks[hits..] {
            if lru.touch(b) || pending.contains(&b) {
                continue;
            }
            if lru.at.len() + pending.len() >= lru.capacity && !lru.evict() {
                continue;
            }
            pending.push(b);
        }
        for b in pending {
            lru.insert(b);
        }
    }
    (looked_up, hit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_ratio_equals_an_offline_lru_of_the_same_trace_and_capacity() {
    let text = format!(
        r#"
name = "oracle"
[cluster]
nodes = 1
engines_per_node = 1
pool = "{POOL_MIB}MiB"
[engine]
block_size = {BLOCK}
[workload]
kind = "trace"
path = "{}"
requests = {REQUESTS}
"#,
        trace()
    );
    let scenario = Scenario::parse(&text, Path::new("/")).expect("scenario");
    let (looked_up, hit) = offline_lru();
    let report = run(
        &scenario,
        &Options {
            quiet: true,
            ..Options::default()
        },
    )
    .await
    .expect("replay");
    let run = &report.runs[0];
    assert_eq!(run.capacity_pages, (POOL_MIB << 20) / PAGE);
    assert!(
        run.tiers.evictions > 0,
        "the slice must overflow the pool to test eviction"
    );
    assert_eq!(run.blocks.looked_up, looked_up);
    assert_eq!(
        run.blocks.hit, hit,
        "harness {} hits vs offline LRU {hit} of {looked_up}",
        run.blocks.hit
    );
    assert_eq!(run.blocks.corrupt, 0);
    assert!(hit > 0);
}
