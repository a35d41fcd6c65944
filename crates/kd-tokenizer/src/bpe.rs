//! The BPE merge loop: priority by merge rank, leftmost first on ties, as in
//! Hugging Face `tokenizers` and llama.cpp.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// Merge table and byte tokens of a byte-level BPE model.
#[derive(Clone, Debug)]
pub(crate) struct Bpe {
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token of each single byte; `None` where the vocabulary lacks it.
    byte_ids: [Option<u32>; 256],
}

#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: usize,
    next: usize,
    /// 0 once merged into its left neighbour.
    len: u32,
}

const NONE: usize = usize::MAX;

impl Bpe {
    pub(crate) fn new(
        merges: HashMap<(u32, u32), (u32, u32)>,
        byte_ids: [Option<u32>; 256],
    ) -> Bpe {
        Bpe { merges, byte_ids }
    }

    /// Bytes for which the vocabulary has no token; [`Bpe::encode_word`] drops them.
    pub(crate) fn missing_bytes(&self) -> Vec<u8> {
        (0..=255u8)
            .filter(|&b| self.byte_ids[b as usize].is_none())
            .collect()
    }

    /// The token of one byte, if the vocabulary has one.
    pub(crate) fn byte_id(&self, b: u8) -> Option<u32> {
        self.byte_ids[b as usize]
    }

    /// Appends the ids of one pre-tokenized word.
    pub(crate) fn encode_word(&self, word: &[u8], out: &mut Vec<u32>) {
        // As in `tokenizers` without an unk token: a byte with no token is dropped.
        let ids: Vec<u32> = word
            .iter()
            .filter_map(|&b| self.byte_ids[b as usize])
            .collect();
        self.merge(ids, out);
    }

    /// Applies the merges to a word given as its initial tokens and appends the result.
    pub(crate) fn merge(&self, ids: Vec<u32>, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(ids.len());
        for id in ids {
            let idx = symbols.len();
            symbols.push(Symbol {
                id,
                prev: if idx == 0 { NONE } else { idx - 1 },
                next: idx + 1,
                len: 1,
            });
        }
        match symbols.len() {
            0 => return,
            1 => {
                out.push(symbols[0].id);
                return;
            }
            n => symbols[n - 1].next = NONE,
        }

        let mut heap = BinaryHeap::with_capacity(symbols.len());
        for i in 0..symbols.len() - 1 {
            if let Some(&(rank, _)) = self.merges.get(&(symbols[i].id, symbols[i + 1].id)) {
                heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, pos))) = heap.pop() {
            let left = symbols[pos];
            if left.len == 0 || left.next == NONE {
                continue;
            }
            let right = symbols[left.next];
            // Skip entries made stale by an earlier merge: the pair at `pos` changed.
            let Some(&(current_rank, merged)) = self.merges.get(&(left.id, right.id)) else {
                continue;
            };
            if current_rank != rank {
                continue;
            }
            let right_pos = left.next;
            symbols[pos].id = merged;
            symbols[pos].len += right.len;
            symbols[pos].next = right.next;
            symbols[right_pos].len = 0;
            if right.next != NONE {
                symbols[right.next].prev = pos;
                if let Some(&(r, _)) = self.merges.get(&(merged, symbols[right.next].id)) {
                    heap.push(Reverse((r, pos)));
                }
            }
            if left.prev != NONE
                && let Some(&(r, _)) = self.merges.get(&(symbols[left.prev].id, merged))
            {
                heap.push(Reverse((r, left.prev)));
            }
        }

        let mut i = 0;
        while i != NONE {
            out.push(symbols[i].id);
            i = symbols[i].next;
        }
    }
}
