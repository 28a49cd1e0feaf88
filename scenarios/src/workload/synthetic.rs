//! Seeded generators of the prefix patterns engines see: a system prompt shared by everyone,
//! chats whose every turn extends the last, agent loops that append a little per step, and
//! documents asked about with Zipf popularity. They emit hash ids like a Mooncake trace, so a
//! shared prefix is a shared run of ids.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Request;
use crate::scenario::{Generator, SyntheticSpec};

/// Hands out fresh hash ids.
struct Ids(u64);

impl Ids {
    fn take(&mut self, n: usize) -> Vec<u64> {
        let start = self.0;
        self.0 += n as u64;
        (start..self.0).collect()
    }
}

/// One growing context: its hash ids and token count.
struct Context {
    ids: Vec<u64>,
    tokens: u32,
    turns: usize,
}

impl Context {
    /// Extends the context by `more` tokens: full blocks keep their ids, the trailing partial
    /// block changes content and so gets a new id, as does every new block.
    fn extend(&mut self, more: u32, hb: u32, ids: &mut Ids) {
        let full = (self.tokens / hb) as usize;
        self.ids.truncate(full);
        self.tokens += more;
        let need = self.tokens.div_ceil(hb) as usize;
        self.ids.extend(ids.take(need - full));
    }
}

/// The requests of a synthetic workload; the same spec always gives the same requests.
pub fn generate(spec: &SyntheticSpec) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let hb = spec.hash_block_tokens.max(1);
    let mut ids = Ids(0);
    // Only whole blocks of the system prompt are shared; its tail shares a block with the
    // unique text that follows.
    let system_blocks = (spec.system_prompt_tokens / hb) as usize;
    let system = ids.take(system_blocks);
    let start = || Context {
        ids: system.clone(),
        tokens: system_blocks as u32 * hb,
        turns: 0,
    };
    let zipf = Zipf::new(spec.documents.max(1), spec.zipf_s);
    let doc_blocks = spec.document_tokens.div_ceil(hb) as usize;
    let documents: Vec<Vec<u64>> = (0..spec.documents.max(1))
        .map(|_| ids.take(doc_blocks))
        .collect();
    let mut active: Vec<Context> = (0..spec.conversations.max(1)).map(|_| start()).collect();
    let mut now = 0.0f64;
    let mut requests = Vec::with_capacity(spec.requests);
    for _ in 0..spec.requests {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        now += -u.ln() * spec.mean_gap_ms;
        let (hash_ids, input_tokens) = match spec.generator {
            Generator::SharedPrompt => {
                let mut context = start();
                context.extend(spec.user_tokens, hb, &mut ids);
                (context.ids, context.tokens)
            }
            Generator::Zipf => {
                let doc = &documents[zipf.sample(&mut rng)];
                let mut context = Context {
                    ids: system.iter().chain(doc).copied().collect(),
                    tokens: (system_blocks + doc_blocks) as u32 * hb,
                    turns: 0,
                };
                context.extend(spec.user_tokens, hb, &mut ids);
                (context.ids, context.tokens)
            }
            Generator::MultiTurn | Generator::AgentLoop => {
                let slot = rng.random_range(0..active.len());
                let context = &mut active[slot];
                if context.turns > 0 {
                    context.extend(spec.output_tokens, hb, &mut ids);
                }
                context.extend(spec.user_tokens, hb, &mut ids);
                context.turns += 1;
                let request = (context.ids.clone(), context.tokens);
                if context.turns >= spec.turns.max(1) {
                    active[slot] = start();
                }
                request
            }
        };
        requests.push(Request {
            at_ms: now as u64,
            input_tokens,
            output_tokens: spec.output_tokens,
            hash_ids,
        });
    }
    requests
}

/// Zipf over ranks `0..n` by inverse CDF: rank r has weight `1 / (r + 1)^s`.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|r| {
                total += 1.0 / (r as f64).powf(s);
                total
            })
            .collect();
        for c in &mut cdf {
            *c /= total;
        }
        Self { cdf }
    }

    fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(generator: Generator) -> SyntheticSpec {
        SyntheticSpec {
            generator,
            seed: 42,
            requests: 200,
            mean_gap_ms: 10.0,
            hash_block_tokens: 512,
            system_prompt_tokens: 1024,
            user_tokens: 300,
            output_tokens: 100,
            conversations: 4,
            turns: 5,
            documents: 50,
            document_tokens: 2048,
            zipf_s: 1.2,
        }
    }

    #[test]
    fn generators_are_seeded_and_cover_their_prompts() {
        for g in [
            Generator::SharedPrompt,
            Generator::MultiTurn,
            Generator::AgentLoop,
            Generator::Zipf,
        ] {
            let a = generate(&spec(g));
            assert_eq!(a, generate(&spec(g)), "{g:?} is deterministic");
            assert_eq!(a.len(), 200);
            for r in &a {
                assert_eq!(
                    r.hash_ids.len() as u32,
                    r.input_tokens.div_ceil(512),
                    "{g:?}"
                );
                assert_eq!(r.hash_ids[..2], [0, 1], "{g:?}: system prompt first");
            }
            assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        }
    }

    #[test]
    fn turns_extend_their_conversation() {
        let requests = generate(&SyntheticSpec {
            conversations: 1,
            ..spec(Generator::MultiTurn)
        });
        let (a, b) = (&requests[0], &requests[1]);
        let full = (a.input_tokens / 512) as usize;
        assert_eq!(a.hash_ids[..full], b.hash_ids[..full]);
        assert_eq!(b.input_tokens, a.input_tokens + 100 + 300);
    }

    #[test]
    fn zipf_prefers_low_ranks() {
        let zipf = Zipf::new(100, 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let first = (0..10_000).filter(|_| zipf.sample(&mut rng) == 0).count();
        assert!(
            (1500..2500).contains(&first),
            "rank 0 drawn {first} times of 10000"
        );
    }
}
