//! From hash ids to token ids and block keys. Each token is a pure function of its hash id and
//! its position inside that id's block, so equal hash ids give equal tokens, equal token
//! prefixes give equal key chains (`pegaflow_actors::keys::chain_keys`), and the keys behave
//! exactly like the prefixes of real prompts.

use pegaflow_actors::keys::{chain_keys, BlockKey};

use super::Request;

/// Vocabulary the token ids are drawn from (Llama 3's).
const VOCAB: u64 = 128_256;

/// SplitMix64: a cheap, well-mixed bijection on u64.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The prompt's token ids.
pub fn tokens(request: &Request, hash_block_tokens: u32) -> Vec<u32> {
    let hb = u64::from(hash_block_tokens);
    (0..u64::from(request.input_tokens))
        .map(|i| {
            let id = request.hash_ids[(i / hb) as usize];
            (mix(id.wrapping_mul(hb).wrapping_add(i % hb) ^ 0x7065_6761) % VOCAB) as u32
        })
        .collect()
}

/// The keys of the prompt's full KV blocks.
pub fn block_keys(
    namespace: &BlockKey,
    request: &Request,
    hash_block_tokens: u32,
    block_size: u32,
) -> Vec<BlockKey> {
    chain_keys(
        namespace,
        &tokens(request, hash_block_tokens),
        block_size as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(ids: &[u64], len: u32) -> Request {
        Request {
            at_ms: 0,
            input_tokens: len,
            output_tokens: 1,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn equal_hash_prefixes_give_equal_key_prefixes() {
        let ns = [3u8; 32];
        let a = block_keys(&ns, &request(&[0, 1, 2], 1500), 512, 32);
        let b = block_keys(&ns, &request(&[0, 1, 9], 1536), 512, 32);
        let c = block_keys(&ns, &request(&[5, 1, 2], 1500), 512, 32);
        assert_eq!(a.len(), 1500 / 32);
        assert_eq!(b.len(), 48);
        assert_eq!(
            a[..32],
            b[..32],
            "two shared hash blocks: 32 shared KV blocks"
        );
        assert_ne!(a[32], b[32]);
        assert!(
            a.iter().zip(&c).all(|(x, y)| x != y),
            "a different first block changes every key"
        );
    }
}
