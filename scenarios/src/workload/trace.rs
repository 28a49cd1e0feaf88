//! Mooncake-format traces: one JSON object per line with `timestamp` (ms), `input_length`,
//! `output_length` and `hash_ids` (one per 512-token block, chained like a prefix hash).

use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use super::Request;
use crate::error::ScenarioError;

#[derive(Deserialize)]
struct Line {
    timestamp: u64,
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

/// Reads lines `skip..skip + take` of a trace, checking that every prompt is covered by its
/// hash ids (a trace that is not would make the harness invent prefixes).
pub fn read(
    path: &Path,
    skip: usize,
    take: Option<usize>,
    hash_block_tokens: u32,
) -> Result<Vec<Request>, ScenarioError> {
    let file = std::fs::File::open(path).map_err(|source| ScenarioError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut requests = Vec::new();
    let mut first_ts = None;
    for (index, line) in std::io::BufReader::new(file).lines().enumerate().skip(skip) {
        if take.is_some_and(|take| requests.len() >= take) {
            break;
        }
        let bad = |why: String| ScenarioError::Trace {
            path: path.to_path_buf(),
            line: index + 1,
            why,
        };
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let covered = parsed.hash_ids.len() as u64 * u64::from(hash_block_tokens);
        if covered < u64::from(parsed.input_length) {
            return Err(bad(format!(
                "{} hash ids of {hash_block_tokens} tokens cover {covered} tokens, input_length is {}",
                parsed.hash_ids.len(),
                parsed.input_length
            )));
        }
        // Replays start at the slice's first request, so a slice from the middle of the
        // trace does not open with an idle gap.
        let base = *first_ts.get_or_insert(parsed.timestamp);
        requests.push(Request {
            at_ms: parsed.timestamp.saturating_sub(base),
            input_tokens: parsed.input_length,
            output_tokens: parsed.output_length,
            hash_ids: parsed.hash_ids,
        });
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_a_slice_and_rejects_uncovered_prompts() {
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        writeln!(
            file,
            r#"{{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]}}"#
        )
        .expect("write");
        writeln!(
            file,
            r#"{{"timestamp": 9, "input_length": 100, "output_length": 3, "hash_ids": [0]}}"#
        )
        .expect("write");
        writeln!(
            file,
            r#"{{"timestamp": 9, "input_length": 1100, "output_length": 3, "hash_ids": [0, 1]}}"#
        )
        .expect("write");
        let two = read(file.path(), 0, Some(2), 512).expect("reads");
        assert_eq!(two.len(), 2);
        assert_eq!((two[0].at_ms, two[1].at_ms), (0, 4));
        let err = read(file.path(), 1, None, 512).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }
}
