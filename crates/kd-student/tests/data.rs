//! End-to-end tests of `kd_student::data` over shard sets written in the test.

mod util;

use std::collections::HashSet;

use kd_shard::{MANIFEST_FILE, Row, Source};
use kd_student::data::{
    Batch, BatchConfig, Batcher, CacheStatus, Error, LoaderPosition, RowSource, ShardSet, Split,
    is_held_out,
};
use util::{tiny_set, write_set};

fn cfg(budget: usize, seed: u64) -> BatchConfig {
    BatchConfig {
        token_budget: budget,
        max_len: 64,
        seed,
        ..BatchConfig::default()
    }
}

#[test]
fn open_serves_the_shards_rows() {
    let (d, rows) = tiny_set(40, 4, 3);
    let set = ShardSet::open(d.path()).unwrap();
    assert_eq!(set.len(), 40);
    assert_eq!(set.k(), 4);
    assert_eq!(set.vocab_size(), 300);
    assert_eq!(set.tokenizer_fingerprint(), "toy-tok");
    assert_eq!(set.fingerprint().len(), 64);
    let got: Vec<Row> = set.rows().map(|v| v.to_row()).collect();
    assert_eq!(got, rows);
    assert!(set.cache_dir().starts_with(d.path().join(".kd-cache")));
    // The cache is not a *.parquet file, so the shard directory still verifies.
    assert!(kd_shard::verify_dir(d.path(), true).unwrap().is_ok());
}

#[test]
fn flipped_byte_is_refused_naming_the_shard() {
    let (d, _) = tiny_set(30, 4, 3);
    let p = d.path().join("shard-00001.parquet");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&p, &bytes).unwrap();
    match ShardSet::open(d.path()) {
        Err(Error::ShardHash { path, .. }) => assert_eq!(path, p),
        other => panic!("expected ShardHash, got {other:?}"),
    }
    bytes.push(0);
    std::fs::write(&p, &bytes).unwrap();
    match ShardSet::open(d.path()) {
        Err(Error::ShardSize { path, .. }) => assert_eq!(path, p),
        other => panic!("expected ShardSize, got {other:?}"),
    }
    std::fs::remove_file(&p).unwrap();
    assert!(matches!(ShardSet::open(d.path()), Err(Error::Io { path, .. }) if path == p));
}

#[test]
fn incomplete_or_tampered_manifest_is_refused() {
    let (d, _) = tiny_set(10, 4, 1);
    let mp = d.path().join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&mp).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["complete"] = false.into();
    std::fs::write(&mp, v.to_string()).unwrap();
    assert!(matches!(
        ShardSet::open(d.path()),
        Err(Error::Incomplete { .. })
    ));
    v["complete"] = true.into();
    v["settings"]["temperature"] = 2.0.into();
    std::fs::write(&mp, v.to_string()).unwrap();
    assert!(matches!(
        ShardSet::open(d.path()),
        Err(Error::Fingerprint { .. })
    ));
    std::fs::remove_file(&mp).unwrap();
    assert!(matches!(ShardSet::open(d.path()), Err(Error::Shard(_))));
}

#[test]
fn cache_is_built_once_then_reused_and_rebuilt_when_damaged() {
    let (d, rows) = tiny_set(25, 4, 2);
    let a = ShardSet::open(d.path()).unwrap();
    assert_eq!(a.cache_status(), CacheStatus::Built);
    let cache_dir = a.cache_dir().to_path_buf();
    let fp = a.fingerprint().to_string();
    drop(a);
    let b = ShardSet::open(d.path()).unwrap();
    assert_eq!(b.cache_status(), CacheStatus::Reused);
    assert_eq!(b.cache_dir(), cache_dir);
    assert_eq!(b.fingerprint(), fp);
    assert_eq!(b.rows().map(|v| v.to_row()).collect::<Vec<_>>(), rows);
    drop(b);
    // No temporary directory is left behind.
    let entries: Vec<_> = std::fs::read_dir(d.path().join(".kd-cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    // A damaged cache (truncated file) is set aside and rebuilt, never served.
    let f = cache_dir.join("topk_ids.u32");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 4)
        .unwrap();
    let c = ShardSet::open(d.path()).unwrap();
    assert_eq!(c.cache_status(), CacheStatus::Built);
    assert_eq!(c.rows().map(|v| v.to_row()).collect::<Vec<_>>(), rows);
    // Different shard content gives a different data fingerprint.
    let d2 = tempfile::tempdir().unwrap();
    write_set(d2.path(), &rows[..24], 4, 2, "toy-tok");
    assert_ne!(ShardSet::open(d2.path()).unwrap().fingerprint(), fp);
}

#[test]
fn split_is_stable_across_opens_layouts_and_seeds() {
    let (d, rows) = tiny_set(400, 2, 3);
    let set = ShardSet::open(d.path()).unwrap();
    let s1 = Split::by_id_hash(&set, 0.2).unwrap();
    let s2 = Split::by_id_hash(&ShardSet::open(d.path()).unwrap(), 0.2).unwrap();
    assert_eq!(s1, s2);
    let held: HashSet<&str> = s1.held_out.iter().map(|&i| set.row(i).id).collect();
    // Same rows, reversed and resharded: the same ids are held out.
    let d2 = tempfile::tempdir().unwrap();
    let mut rev = rows.clone();
    rev.reverse();
    write_set(d2.path(), &rev, 2, 5, "toy-tok");
    let set2 = ShardSet::open(d2.path()).unwrap();
    let s3 = Split::by_id_hash(&set2, 0.2).unwrap();
    let held2: HashSet<&str> = s3.held_out.iter().map(|&i| set2.row(i).id).collect();
    assert_eq!(held, held2);
    // Fraction is respected (400 rows, 0.2: binomial sd 8) and monotone.
    assert!(
        (50..=110).contains(&s1.held_out.len()),
        "{}",
        s1.held_out.len()
    );
    let s4 = Split::by_id_hash(&set, 0.4).unwrap();
    assert!(s1.held_out.iter().all(|i| s4.held_out.contains(i)));
    assert_eq!(s1.train.len() + s1.held_out.len(), 400);
    assert!(s1.held_out.iter().all(|&i| is_held_out(set.row(i).id, 0.2)));
    assert!(matches!(
        Split::by_id_hash(&set, 1.5),
        Err(Error::Config { .. })
    ));
    assert_eq!(Split::all(&set).train.len(), 400);
}

fn take(b: &mut Batcher, n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|_| b.next_rows().unwrap()).collect()
}

#[test]
fn shuffle_is_deterministic_per_seed_and_epoch() {
    let (d, _) = tiny_set(60, 2, 2);
    let set = ShardSet::open(d.path()).unwrap();
    let all: Vec<usize> = (0..60).collect();
    let epoch = |seed| {
        let mut b = Batcher::new(&set, &all, cfg(1, seed)).unwrap();
        take(&mut b, 120)
    };
    let a = epoch(7);
    assert_eq!(a, epoch(7));
    assert_ne!(a, epoch(8));
    // Budget 1 gives one row per batch: every epoch is a permutation of all rows.
    let (e0, e1) = a.split_at(60);
    for e in [e0, e1] {
        let mut seen: Vec<usize> = e.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, all);
    }
    assert_ne!(e0, e1, "epochs must be reshuffled");
}

#[test]
fn restore_yields_exactly_the_following_batches() {
    let (d, _) = tiny_set(50, 4, 3);
    let set = ShardSet::open(d.path()).unwrap();
    let split = Split::by_id_hash(&set, 0.1).unwrap();
    let c = cfg(120, 3);
    for n in [0, 1, 7, 23] {
        let mut a = Batcher::new(&set, &split.train, c.clone()).unwrap();
        take(&mut a, n);
        let saved = serde_json::to_string(&a.position()).unwrap();
        // 40 batches crosses several epoch boundaries.
        let want: Vec<Batch> = (0..40).map(|_| a.next_batch(&set).unwrap()).collect();
        let mut b = Batcher::new(&set, &split.train, c.clone()).unwrap();
        b.restore(serde_json::from_str::<LoaderPosition>(&saved).unwrap())
            .unwrap();
        let got: Vec<Batch> = (0..40).map(|_| b.next_batch(&set).unwrap()).collect();
        assert_eq!(got, want, "after {n} batches");
    }
    let mut b = Batcher::new(&set, &split.train, c).unwrap();
    assert!(matches!(
        b.restore(LoaderPosition {
            epoch: 2,
            index: 10_000
        }),
        Err(Error::Restore { .. })
    ));
}

#[test]
fn batches_respect_the_token_budget_and_carry_the_right_targets() {
    let (d, _) = tiny_set(80, 4, 2);
    let set = ShardSet::open(d.path()).unwrap();
    let all: Vec<usize> = (0..80).collect();
    let c = BatchConfig {
        token_budget: 60,
        max_len: 12,
        pad_id: 999,
        seed: 1,
        max_epochs: Some(1),
        ..BatchConfig::default()
    };
    let mut b = Batcher::new(&set, &all, c).unwrap();
    let mut seen = 0;
    let mut truncated = 0;
    while let Some(batch) = b.next_batch(&set) {
        let (n, l) = (batch.batch_size(), batch.seq_len);
        assert!(n >= 1);
        assert!(n * l <= 60 || n == 1, "{n} x {l}");
        assert!(l <= 12);
        assert_eq!(batch.input_ids.len(), n * l);
        let t = &batch.teachers[0];
        assert_eq!(t.topk_ids.len(), batch.n_pos() * 4);
        assert_eq!(t.topk_logprobs.len(), batch.n_pos() * 4);
        assert_eq!(t.token_logprob.len(), batch.n_pos());
        let mut expected_pos = 0;
        for (bi, &r) in batch.rows.iter().enumerate() {
            let v = set.row(r);
            let len = batch.lengths[bi] as usize;
            assert_eq!(len, v.input_ids.len().min(12));
            truncated += usize::from(v.input_ids.len() > 12);
            assert_eq!(&batch.input_ids[bi * l..bi * l + len], &v.input_ids[..len]);
            assert!(
                batch.input_ids[bi * l + len..(bi + 1) * l]
                    .iter()
                    .all(|&x| x == 999)
            );
            expected_pos += len.saturating_sub(v.prompt_len as usize);
        }
        assert_eq!(batch.n_pos(), expected_pos);
        for p in 0..batch.n_pos() {
            let bi = batch.pos_row[p] as usize;
            let tt = batch.pos_t[p] as usize;
            let v = set.row(batch.rows[bi]);
            assert!(
                tt + 1 < batch.lengths[bi] as usize,
                "padding position leaked"
            );
            assert!(tt + 1 >= v.prompt_len as usize, "prompt position leaked");
            assert_eq!(batch.next_token[p], v.input_ids[tt + 1]);
            assert_eq!(batch.next_token[p], batch.input_ids[bi * l + tt + 1]);
            let j = tt + 1 - v.prompt_len as usize;
            assert_eq!(&t.topk_ids[p * 4..p * 4 + 4], &v.topk_ids[j * 4..j * 4 + 4]);
            assert_eq!(
                &t.topk_logprobs[p * 4..p * 4 + 4],
                &v.topk_logprobs[j * 4..j * 4 + 4]
            );
            assert_eq!(t.token_logprob[p], v.token_logprob[j]);
        }
        seen += n;
    }
    assert_eq!(seen, 80, "one epoch visits every row once");
    assert!(truncated > 0, "fixture should exercise truncation");
    // A budget smaller than any row still yields one row per batch.
    let mut b = Batcher::new(&set, &all, cfg(1, 0)).unwrap();
    assert_eq!(b.next_rows().unwrap().len(), 1);
    assert!(matches!(
        Batcher::new(&set, &all, cfg(0, 0)),
        Err(Error::Config { .. })
    ));
}

#[test]
fn mix_interleaves_sources_to_the_ratio() {
    let (d, _) = tiny_set(300, 2, 2);
    let set = ShardSet::open(d.path()).unwrap();
    let all: Vec<usize> = (0..300).collect();
    for share in [0.7, 0.5, 0.2] {
        let c = BatchConfig {
            mix: Some(share),
            max_epochs: Some(1),
            ..cfg(1, 11)
        };
        let mut b = Batcher::new(&set, &all, c.clone()).unwrap();
        let order: Vec<usize> = std::iter::from_fn(|| b.next_rows()).flatten().collect();
        let mut gen_count = 0usize;
        for (n, &r) in order.iter().enumerate() {
            gen_count += usize::from(set.row(r).source == Source::Generated);
            // Every prefix holds share × n generated rows, within one row.
            let target = share * (n + 1) as f64;
            assert!(
                (gen_count as f64 - target).abs() <= 1.0,
                "share {share} at {n}"
            );
        }
        assert!(order.len() > 100);
        let mut again = Batcher::new(&set, &all, c).unwrap();
        let order2: Vec<usize> = std::iter::from_fn(|| again.next_rows()).flatten().collect();
        assert_eq!(order, order2);
    }
    assert!(matches!(
        Batcher::new(
            &set,
            &all,
            BatchConfig {
                mix: Some(1.0),
                ..cfg(1, 0)
            }
        ),
        Err(Error::Config { .. })
    ));
}

/// Teacher 2's view of the same sequences: other shard order and layout, k = 2 (its own
/// top-2, here the first two of teacher 1's lists), and its own log-probs.
fn second_teacher(rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = rows
        .iter()
        .map(|r| {
            let n = r.n_pos();
            let mut t = r.clone();
            t.topk_ids = (0..n)
                .flat_map(|j| r.topk_ids[j * 4..j * 4 + 2].to_vec())
                .collect();
            t.topk_logprobs = (0..n)
                .flat_map(|j| r.topk_logprobs[j * 4..j * 4 + 2].iter().map(|x| x - 0.5))
                .collect();
            t
        })
        .collect();
    out.reverse();
    out
}

#[test]
fn teachers_join_by_id() {
    let (d1, rows) = tiny_set(30, 4, 2);
    let d2 = tempfile::tempdir().unwrap();
    write_set(d2.path(), &second_teacher(&rows), 2, 3, "toy-tok");
    let t = ShardSet::zip(
        vec![
            ShardSet::open(d1.path()).unwrap(),
            ShardSet::open(d2.path()).unwrap(),
        ],
        vec![0.75, 0.25],
    )
    .unwrap();
    assert_eq!(t.n_teachers(), 2);
    assert_eq!(t.fingerprint().len(), 64);
    for i in 0..t.len() {
        let v = t.row(i);
        assert_eq!(v[0].id, v[1].id);
        assert_eq!(v[0].input_ids, v[1].input_ids);
        assert_eq!(v[1].topk_ids.len(), v[1].n_pos() * 2);
    }
    let all: Vec<usize> = (0..30).collect();
    let mut b = Batcher::new(&t, &all, cfg(100, 0)).unwrap();
    let batch = b.next_batch(&t).unwrap();
    assert_eq!(batch.teachers.len(), 2);
    assert_eq!(batch.teachers[1].k, 2);
    assert_eq!(batch.teachers[1].topk_ids.len(), batch.n_pos() * 2);
    for p in 0..batch.n_pos() {
        assert_eq!(
            batch.teachers[1].topk_ids[p * 2..p * 2 + 2],
            batch.teachers[0].topk_ids[p * 4..p * 4 + 2]
        );
    }
}

#[test]
fn teachers_that_disagree_are_refused_naming_the_row() {
    let (d1, rows) = tiny_set(30, 4, 2);
    let open = |rows: &[Row], tok: &str| {
        let d = tempfile::tempdir().unwrap();
        write_set(d.path(), rows, 2, 2, tok);
        let s = ShardSet::open(d.path()).unwrap();
        (d, s)
    };
    let base = || ShardSet::open(d1.path()).unwrap();
    let good = second_teacher(&rows);

    let (_d, other) = open(&good, "other-tok");
    let e = ShardSet::zip(vec![base(), other], vec![0.5, 0.5]).unwrap_err();
    assert!(
        matches!(&e, Error::Mismatch { teacher: 1, id: None, field, .. } if field == "tokenizer.fingerprint"),
        "{e:?}"
    );

    // tiny-00007 has a different token at its first position.
    let mut bad = good.clone();
    let r = bad.iter_mut().find(|r| r.id == "tiny-00007").unwrap();
    r.input_ids[0] = (r.input_ids[0] + 1) % 300;
    let (_d, other) = open(&bad, "toy-tok");
    let e = ShardSet::zip(vec![base(), other], vec![0.5, 0.5]).unwrap_err();
    assert!(
        matches!(&e, Error::Mismatch { teacher: 1, id: Some(id), field, .. } if id == "tiny-00007" && field == "input_ids"),
        "{e:?}"
    );

    let mut bad = good.clone();
    bad.iter_mut().find(|r| r.id == "tiny-00004").unwrap().id = "elsewhere".into();
    let (_d, other) = open(&bad, "toy-tok");
    let e = ShardSet::zip(vec![base(), other], vec![0.5, 0.5]).unwrap_err();
    assert!(
        matches!(&e, Error::Mismatch { id: Some(id), field, .. } if id == "tiny-00004" && field == "id"),
        "{e:?}"
    );

    let (_d, other) = open(&good[1..], "toy-tok");
    let e = ShardSet::zip(vec![base(), other], vec![0.5, 0.5]).unwrap_err();
    assert!(
        matches!(&e, Error::Mismatch { field, .. } if field == "rows"),
        "{e:?}"
    );

    let (_d, other) = open(&good, "toy-tok");
    let e = ShardSet::zip(vec![base(), other], vec![0.5, 0.6]).unwrap_err();
    assert!(matches!(e, Error::Config { .. }));
}

/// Rows whose prompt fills `max_len` stay in the batch (padding-free width) but contribute no
/// distilled positions.
#[test]
fn prompt_longer_than_max_len_gives_no_positions() {
    let (d, _) = tiny_set(20, 4, 1);
    let set = ShardSet::open(d.path()).unwrap();
    let all: Vec<usize> = (0..20).collect();
    let long_prompt: Vec<usize> = all
        .iter()
        .copied()
        .filter(|&i| set.row(i).prompt_len >= 3)
        .collect();
    assert!(!long_prompt.is_empty());
    let batch = Batch::collect(&set, &long_prompt, 3, 0);
    assert_eq!(batch.n_pos(), 0);
    assert_eq!(batch.seq_len, 3);
    let batch = Batch::collect(&set, &all, 3, 0);
    let want: usize = all
        .iter()
        .map(|&i| {
            set.row(i)
                .input_ids
                .len()
                .min(3)
                .saturating_sub(set.row(i).prompt_len as usize)
        })
        .sum();
    assert_eq!(batch.n_pos(), want);
}
