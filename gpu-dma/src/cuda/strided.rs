//! Merging a block's copies over consecutive layers into one strided (2D) copy.
//!
//! Why: the copy engines pay a fixed cost per copy, which on an H100 is small for H2D but about
//! 0.2 us per D2H copy (what 0.87x / 0.93x / 0.96x of contiguous memcpy with 64 / 128 / 256 KiB
//! copies imply, at 55 GB/s). A stored page holds one block of every layer, layer after layer,
//! and an engine's KV region holds each layer at a fixed stride from the previous one, so op `i`
//! of layer `L + 1` sits at the same distance from op `i` of layer `L` on each side. Those ops of
//! several layers are then one copy of `rows` equal runs with a pitch on each side (a 2D copy,
//! expected to be one copy-engine launch), and a batch of them is one `cuMemcpy3DBatchAsync`.
//!
//! Merging adjacent blocks instead does not apply: within a layer, two blocks' copies are a whole
//! page apart in the arena even when their pages are adjacent.
//!
//! Merging is opportunistic and exact: a run of layers is merged only where lengths match and
//! both sides' strides are equal and non-overlapping (pitch at least the length, at most the
//! device's maximum pitch); anything else stays a one-row copy. Pieces never span two pinned
//! chunks of the arena (the driver refuses a copy covering two registrations).

use crate::engine::{CopyOp, Direction};

/// One [`CopyOp`] repeated over `rows` consecutive layers at fixed pitches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StridedOp {
    /// The first row (the first layer's op).
    pub op: CopyOp,
    /// Rows, at least 1.
    pub rows: u64,
    /// Bytes from one row to the next in the region (the length when `rows` is 1).
    pub region_pitch: u64,
    /// Bytes from one row to the next in the arena (the length when `rows` is 1).
    pub arena_pitch: u64,
}

impl StridedOp {
    fn single(op: CopyOp) -> StridedOp {
        StridedOp {
            op,
            rows: 1,
            region_pitch: op.len,
            arena_pitch: op.len,
        }
    }

    /// Appends `next` as one more row if it continues this op's strides; false if it does not.
    fn extend(&mut self, next: &CopyOp, max_pitch: u64) -> bool {
        if next.len != self.op.len {
            return false;
        }
        if self.rows == 1 {
            let pitch = |from: u64, to: u64| {
                to.checked_sub(from)
                    .filter(|&p| p >= next.len && p <= max_pitch)
            };
            let (Some(region), Some(arena)) = (
                pitch(self.op.region_offset, next.region_offset),
                pitch(self.op.arena_offset, next.arena_offset),
            ) else {
                return false;
            };
            (self.region_pitch, self.arena_pitch) = (region, arena);
        } else {
            let at = |base: u64, pitch: u64| base.checked_add(self.rows.checked_mul(pitch)?);
            if at(self.op.region_offset, self.region_pitch) != Some(next.region_offset)
                || at(self.op.arena_offset, self.arena_pitch) != Some(next.arena_offset)
            {
                return false;
            }
        }
        self.rows += 1;
        true
    }
}

/// Merges op `i` of consecutive `layers` into strided ops where their strides allow (see the
/// module docs); empty ops are dropped. Layers with different op counts are not merged.
pub(crate) fn merge_layers<L: AsRef<[CopyOp]>>(layers: &[L], max_pitch: u64) -> Vec<StridedOp> {
    let Some(first) = layers.first().map(AsRef::as_ref) else {
        return Vec::new();
    };
    let nonempty = |op: &&CopyOp| op.len > 0;
    if layers.iter().any(|ops| ops.as_ref().len() != first.len()) {
        return layers
            .iter()
            .flat_map(AsRef::as_ref)
            .filter(nonempty)
            .copied()
            .map(StridedOp::single)
            .collect();
    }
    let mut out = Vec::with_capacity(first.len());
    for i in 0..first.len() {
        let mut run: Option<StridedOp> = None;
        for op in layers.iter().map(|ops| &ops.as_ref()[i]).filter(nonempty) {
            let extended = run.as_mut().is_some_and(|r| r.extend(op, max_pitch));
            if !extended {
                out.extend(run.replace(StridedOp::single(*op)));
            }
        }
        out.extend(run);
    }
    out
}

/// A strided copy between absolute addresses: row `r` copies `len` bytes from
/// `src + r * src_pitch` to `dst + r * dst_pitch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StridedDesc {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub rows: u64,
    pub src_pitch: u64,
    pub dst_pitch: u64,
}

/// Appends the descriptors of `ops` to `out`: absolute addresses for `direction`, each op cut into
/// runs of rows that lie in one `arena_boundary`-aligned chunk of the arena; a row that itself
/// crosses a boundary becomes one-row pieces split there.
pub(crate) fn strided_descriptors(
    ops: &[StridedOp],
    direction: Direction,
    region_base: u64,
    arena_base: u64,
    arena_boundary: u64,
    out: &mut Vec<StridedDesc>,
) {
    let boundary = arena_boundary.max(1);
    for s in ops {
        let chunk_of_row = |r: u64| {
            let start = s.op.arena_offset + r * s.arena_pitch;
            let (first, last) = (start / boundary, (start + s.op.len - 1) / boundary);
            (first == last).then_some(first)
        };
        let mut r = 0;
        while r < s.rows {
            let Some(chunk) = chunk_of_row(r) else {
                split_row(s, r, boundary, |piece| {
                    out.push(describe(&piece, direction, region_base, arena_base))
                });
                r += 1;
                continue;
            };
            let mut rows = 1;
            while r + rows < s.rows && chunk_of_row(r + rows) == Some(chunk) {
                rows += 1;
            }
            let piece = StridedOp {
                op: CopyOp {
                    region_offset: s.op.region_offset + r * s.region_pitch,
                    arena_offset: s.op.arena_offset + r * s.arena_pitch,
                    len: s.op.len,
                },
                rows,
                ..*s
            };
            out.push(describe(&piece, direction, region_base, arena_base));
            r += rows;
        }
    }
}

/// Row `r` of `s`, cut where it crosses multiples of `boundary` in the arena, one piece at a time.
fn split_row(s: &StridedOp, r: u64, boundary: u64, mut emit: impl FnMut(StridedOp)) {
    let (region, arena) = (
        s.op.region_offset + r * s.region_pitch,
        s.op.arena_offset + r * s.arena_pitch,
    );
    let mut done = 0;
    while done < s.op.len {
        let len = (boundary - (arena + done) % boundary).min(s.op.len - done);
        emit(StridedOp::single(CopyOp {
            region_offset: region + done,
            arena_offset: arena + done,
            len,
        }));
        done += len;
    }
}

/// The absolute-address descriptor of `s` for `direction`.
fn describe(s: &StridedOp, direction: Direction, region_base: u64, arena_base: u64) -> StridedDesc {
    let region = (region_base + s.op.region_offset, s.region_pitch);
    let arena = (arena_base + s.op.arena_offset, s.arena_pitch);
    let ((src, src_pitch), (dst, dst_pitch)) = match direction {
        Direction::Save => (region, arena),
        Direction::Load => (arena, region),
    };
    StridedDesc {
        src,
        dst,
        len: s.op.len,
        rows: s.rows,
        src_pitch,
        dst_pitch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = u64::MAX;

    fn op(region_offset: u64, arena_offset: u64, len: u64) -> CopyOp {
        CopyOp {
            region_offset,
            arena_offset,
            len,
        }
    }

    /// The vLLM layout: `layers` layers of `blocks` pages of `page` bytes in the region; a stored
    /// block holds every layer's page back to back. Block `b` goes to arena slot `slots[i]`.
    fn vllm(layers: u64, blocks: u64, page: u64, ids: &[u64], slots: &[u64]) -> Vec<Vec<CopyOp>> {
        (0..layers)
            .map(|l| {
                ids.iter()
                    .zip(slots)
                    .map(|(&b, &p)| op((l * blocks + b) * page, (p * layers + l) * page, page))
                    .collect()
            })
            .collect()
    }

    /// Every byte the ops copy, as `(region offset, arena offset)` pairs, sorted.
    fn bytes_of_ops(layers: &[Vec<CopyOp>]) -> Vec<(u64, u64)> {
        let mut out: Vec<_> = layers
            .iter()
            .flatten()
            .flat_map(|o| (0..o.len).map(move |k| (o.region_offset + k, o.arena_offset + k)))
            .collect();
        out.sort_unstable();
        out
    }

    fn bytes_of_strided(ops: &[StridedOp]) -> Vec<(u64, u64)> {
        let mut out: Vec<_> = ops
            .iter()
            .flat_map(|s| {
                (0..s.rows).flat_map(move |r| {
                    (0..s.op.len).map(move |k| {
                        (
                            s.op.region_offset + r * s.region_pitch + k,
                            s.op.arena_offset + r * s.arena_pitch + k,
                        )
                    })
                })
            })
            .collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn each_block_of_a_vllm_layout_becomes_one_copy_over_all_layers() {
        let layers = vllm(4, 10, 16, &[7, 2, 5], &[1, 0, 3]);
        let merged = merge_layers(&layers, MAX);
        assert_eq!(merged.len(), 3, "{merged:?}");
        assert_eq!(
            merged[0],
            StridedOp {
                op: op(7 * 16, 4 * 16, 16),
                rows: 4,
                region_pitch: 10 * 16,
                arena_pitch: 16,
            }
        );
        assert!(merged.iter().all(|s| s.rows == 4));
        assert_eq!(bytes_of_strided(&merged), bytes_of_ops(&layers));
    }

    #[test]
    fn a_broken_stride_starts_a_new_run_and_nothing_is_lost() {
        let mut layers = vllm(5, 10, 16, &[3, 4], &[0, 1]);
        // Layer 3 of the first block lives somewhere else: rows 0-2 merge, then 3-4.
        layers[3][0].region_offset = 900;
        layers[4][0].region_offset = 900 + 10 * 16;
        let merged = merge_layers(&layers, MAX);
        let rows: Vec<u64> = merged.iter().map(|s| s.rows).collect();
        assert_eq!(rows, [3, 2, 5]);
        assert_eq!(bytes_of_strided(&merged), bytes_of_ops(&layers));
    }

    #[test]
    fn overlapping_descending_or_too_wide_pitches_and_odd_shapes_are_not_merged() {
        // Pitch smaller than the length (rows would overlap), descending offsets, a pitch above
        // the device maximum, different lengths, and layers with different op counts.
        let overlap = [vec![op(0, 0, 16)], vec![op(8, 100, 16)]];
        let descending = [vec![op(100, 0, 16)], vec![op(0, 100, 16)]];
        let lens = [vec![op(0, 0, 16)], vec![op(100, 100, 8)]];
        let counts = [vec![op(0, 0, 16)], vec![op(100, 100, 16), op(200, 200, 16)]];
        for layers in [&overlap[..], &descending, &lens, &counts] {
            let merged = merge_layers(layers, MAX);
            assert!(merged.iter().all(|s| s.rows == 1), "{merged:?}");
            assert_eq!(bytes_of_strided(&merged), bytes_of_ops(layers));
        }
        let wide = [vec![op(0, 0, 16)], vec![op(1000, 16, 16)]];
        assert_eq!(merge_layers(&wide, 999).len(), 2);
        assert_eq!(merge_layers(&wide, 1000).len(), 1);
    }

    #[test]
    fn empty_ops_are_dropped() {
        let layers = [
            vec![op(0, 0, 0), op(5, 5, 4)],
            vec![op(9, 9, 0), op(105, 25, 4)],
        ];
        let merged = merge_layers(&layers, MAX);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].rows, 2);
        assert!(merge_layers::<Vec<CopyOp>>(&[], MAX).is_empty());
    }

    #[test]
    fn descriptors_follow_the_direction_and_swap_the_pitches() {
        let s = StridedOp {
            op: op(10, 20, 4),
            rows: 3,
            region_pitch: 100,
            arena_pitch: 8,
        };
        let mut out = Vec::new();
        strided_descriptors(&[s], Direction::Save, 1000, 5000, 1 << 20, &mut out);
        strided_descriptors(&[s], Direction::Load, 1000, 5000, 1 << 20, &mut out);
        let save = StridedDesc {
            src: 1010,
            dst: 5020,
            len: 4,
            rows: 3,
            src_pitch: 100,
            dst_pitch: 8,
        };
        let load = StridedDesc {
            src: 5020,
            dst: 1010,
            src_pitch: 8,
            dst_pitch: 100,
            ..save
        };
        assert_eq!(out, [save, load]);
    }

    #[test]
    fn random_layouts_copy_every_byte_once_and_never_span_a_chunk() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let (layers, blocks) = (rng.random_range(1..6), rng.random_range(1..6u64));
            let page = rng.random_range(1..40);
            let ids: Vec<u64> = (0..blocks)
                .map(|b| b * 3 + rng.random_range(0..3))
                .collect();
            let mut plan = vllm(layers, 20, page, &ids, &ids);
            // Break some strides so runs split.
            for layer in plan.iter_mut().skip(1) {
                if rng.random_bool(0.2) {
                    layer[0].arena_offset += 1;
                }
            }
            let merged = merge_layers(&plan, rng.random_range(page..page * 40));
            assert_eq!(bytes_of_strided(&merged), bytes_of_ops(&plan));
            let boundary = rng.random_range(1..200);
            let mut out = Vec::new();
            strided_descriptors(&merged, Direction::Save, 0, 0, boundary, &mut out);
            let mut copied: Vec<(u64, u64)> = out
                .iter()
                .flat_map(|d| {
                    let last = d.dst + (d.rows - 1) * d.dst_pitch + d.len - 1;
                    assert_eq!(d.dst / boundary, last / boundary, "{d:?} spans a chunk");
                    (0..d.rows).flat_map(move |r| {
                        (0..d.len).map(move |k| {
                            (d.src + r * d.src_pitch + k, d.dst + r * d.dst_pitch + k)
                        })
                    })
                })
                .collect();
            copied.sort_unstable();
            assert_eq!(copied, bytes_of_ops(&plan));
        }
    }

    #[test]
    fn descriptors_never_span_two_pinned_chunks_of_the_arena() {
        // Rows at arena 90, 100, 110, 120, 130 (len 10) with chunks of 115 bytes: rows 0 and 1
        // lie in chunk 0, row 2 straddles 115, rows 3 and 4 lie in chunk 1.
        let s = StridedOp {
            op: op(0, 90, 10),
            rows: 5,
            region_pitch: 1000,
            arena_pitch: 10,
        };
        let mut out = Vec::new();
        strided_descriptors(&[s], Direction::Save, 0, 0, 115, &mut out);
        let spans: Vec<(u64, u64, u64, u64)> =
            out.iter().map(|d| (d.src, d.dst, d.len, d.rows)).collect();
        assert_eq!(
            spans,
            [
                (0, 90, 10, 2),
                (2000, 110, 5, 1),
                (2005, 115, 5, 1),
                (3000, 120, 10, 2)
            ]
        );
        for d in &out {
            let last = d.dst + (d.rows - 1) * d.dst_pitch + d.len - 1;
            assert_eq!(d.dst / 115, last / 115, "{d:?}");
        }
    }
}
