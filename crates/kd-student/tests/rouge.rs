//! ROUGE-L F1 of `kd_student::answers` against the `rouge-score` package (the reference
//! implementation most papers report), on answers with punctuation, digits, case, non-ASCII
//! letters, repeats and empty texts. Skips with a message when python3 with `rouge-score`
//! is missing, unless `KD_REQUIRE_ROUGE=1` (CI), where it fails.

use kd_student::answers::rouge_l_f1;

const PAIRS: &[(&str, &str)] = &[
    ("the cat sat on the mat", "the cat was lying on the mat"),
    ("c b a", "a b c"),
    ("café au lait", "cafe au lait"),
    ("The cat's 2 HATS—on mats!", "cats hats on mats"),
    ("", "an answer"),
    ("an answer", ""),
    (
        "The math math math math math",
        "Mathematics is the study of numbers.",
    ),
    (
        "1. Preheat the oven to 350°F.\n2. Mix flour, sugar and eggs.",
        "Preheat your oven to 350 degrees F, then mix the flour and the sugar with 2 eggs.",
    ),
    (
        "Paris is the capital of France.",
        "The capital of France is Paris.",
    ),
    ("Ünïcödé only: ØÆÅ", "plain ascii words only"),
];

#[test]
fn rouge_l_matches_the_rouge_score_package() {
    let script = r#"
import json, sys
from rouge_score import rouge_scorer
s = rouge_scorer.RougeScorer(["rougeL"])
pairs = json.loads(sys.stdin.read())
print(json.dumps([s.score(ref, cand)["rougeL"].fmeasure for cand, ref in pairs]))
"#;
    let input = serde_json::to_string(PAIRS).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes())?;
            child.wait_with_output()
        });
    let out = match out {
        Ok(o) if o.status.success() => o,
        other => {
            assert!(
                std::env::var_os("KD_REQUIRE_ROUGE").is_none(),
                "KD_REQUIRE_ROUGE is set but python3 with rouge-score failed: {other:?}"
            );
            eprintln!("SKIPPED: python3 with rouge-score not found (pip install rouge-score)");
            return;
        }
    };
    let reference: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reference.len(), PAIRS.len());
    for ((cand, refr), want) in PAIRS.iter().zip(reference) {
        let got = rouge_l_f1(cand, refr);
        assert!(
            (got - want).abs() < 1e-12,
            "{cand:?} against {refr:?}: ours {got}, rouge-score {want}"
        );
    }
}
