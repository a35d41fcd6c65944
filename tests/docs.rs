//! The study block of `docs/study/README.md` is what `pipelines/study.sh` wrote: its tables
//! equal those of `docs/study/results.md`, line for line, and the plots it embeds (linked
//! relative to `docs/study/`) exist.

mod util;

/// The Markdown table rows (`|`-prefixed lines) of `text`.
fn table_rows(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with('|')).collect()
}

#[test]
fn readme_study_block_matches_the_study_files() {
    let root = util::root();
    let readme =
        std::fs::read_to_string(root.join("docs/study/README.md")).expect("docs/study/README.md");
    let (_, rest) = readme
        .split_once("<!-- study:begin -->")
        .expect("docs/study/README.md has a study block");
    let (block, _) = rest.split_once("<!-- study:end -->").expect("block end");
    let results = std::fs::read_to_string(root.join("docs/study/results.md"))
        .expect("docs/study/results.md (run ./pipelines/study.sh)");
    let rows = table_rows(block);
    assert!(rows.len() >= 10, "the study block has no tables");
    assert_eq!(
        rows,
        table_rows(&results),
        "docs/study/README.md and docs/study/results.md differ"
    );
    // Every plot the study wrote is embedded, and every embedded plot is a PNG it wrote.
    let mut pngs: Vec<String> = std::fs::read_dir(root.join("docs/study"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    pngs.sort();
    assert!(
        pngs.iter().any(|n| n.starts_with("kl")) && pngs.iter().any(|n| n.starts_with("top1")),
        "docs/study has no KL or top-1 plots: {pngs:?}"
    );
    for png in &pngs {
        assert!(block.contains(&format!("({png})")), "{png} not embedded");
        let bytes = std::fs::read(root.join("docs/study").join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
    }
    let embedded = block.matches(".png)").count();
    assert_eq!(
        embedded,
        pngs.len(),
        "the block embeds a plot docs/study lacks"
    );
}
