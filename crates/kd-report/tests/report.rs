//! End to end: a tiny study folder written in the test, the report written from it, and
//! every output file read back.

mod util;

use std::path::Path;
use std::process::Command;

use kd_report::{Error, Options, Report, write_report};
use serde_json::json;
use util::{FKL_KL, FKL_TOP1, SFT_KL, SFT_TOP1, write_jsonl, write_study, write_text};

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join("results").join(name)).unwrap()
}

/// Checks the PNG signature and the IHDR chunk (width and height, big-endian), decodes the
/// image and returns how many of its pixels are not white.
fn check_png(path: &Path, width: u32, height: u32) -> usize {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), width);
    assert_eq!(
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
        height
    );
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (width, height));
    buf[..info.buffer_size()]
        .chunks(3)
        .filter(|px| px != &[255, 255, 255])
        .count()
}

#[test]
fn report_of_a_small_study() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_study(dir);
    let written = write_report(dir, &Options::default()).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for name in [
        "metrics.csv",
        "results.json",
        "results.md",
        "kl.png",
        "top1.png",
        "cost.png",
        "side-by-side.md",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
        assert!(dir.join("results").join(name).is_file(), "{name}");
    }

    // metrics.csv: exact rows, labels with commas or `|` quoted as needed.
    let csv = read(dir, "metrics.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines,
        [
            "kind,name,label,student,forward_kl,reverse_kl,top1_agreement,nll,eval_positions,train_positions,train_seconds,rouge_l_f1,answered_share,length_ratio",
            "method,init,initialisation (no training),,5.8123,3.91,0.1134,6.9,3000,0,,,,",
            "method,sft,SFT on teacher responses (α = 0),,3.5,2.25,0.3456,4.5,3000,8200,245,,,",
            "method,forward_kl,\"forward KL, top-8 | bucket\",,1.8765,1.3,0.5123,2.9,3000,8200,,,,",
            "cost,k8-bucket,\"top-8, bucket tail\",,2,1.4,0.5,3,3000,4100,,,,",
        ]
    );

    // results.md: the methods table with formatted numbers, the cost table, plots, machine.
    let md = read(dir, "results.md");
    assert!(
        md.starts_with("# Distilling a toy teacher into a tiny student\n"),
        "{md}"
    );
    for row in [
        "| initialisation (no training) | 5.812 | 3.910 | 0.1134 | 6.900 | 0 | – |",
        "| SFT on teacher responses (α = 0) | 3.500 | 2.250 | 0.3456 | 4.500 | 8,200 | 4 min 05 s |",
        "| forward KL, top-8 \\| bucket | 1.877 | 1.300 | 0.5123 | 2.900 | 8,200 | – |",
        "| top-8, bucket tail | 62.5 | 2 min 03 s | 2.000 | 0.5000 |  |",
    ] {
        assert!(md.contains(row), "missing {row:?} in\n{md}");
    }
    for link in [
        "](kl.png)",
        "](top1.png)",
        "](cost.png)",
        "](side-by-side.md)",
    ] {
        assert!(md.contains(link), "{link}");
    }
    assert!(md.contains("2-vCPU test box") && md.contains("`./pipelines/study.sh`"));

    // results.json: parses back into a Report whose curves are the input's.
    let report: Report = serde_json::from_str(&read(dir, "results.json")).unwrap();
    assert_eq!(report.machine, "2-vCPU test box");
    assert_eq!(report.command, "./pipelines/study.sh");
    let methods: Vec<&str> = report.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(methods, ["init", "sft", "forward_kl"]);
    assert!(report.methods[0].curve.is_empty());
    for (m, kl, top1) in [
        (&report.methods[1], SFT_KL, SFT_TOP1),
        (&report.methods[2], FKL_KL, FKL_TOP1),
    ] {
        let got: Vec<(u64, f64, f64, f64)> = m
            .curve
            .iter()
            .map(|p| {
                (
                    p.train_positions,
                    p.forward_kl,
                    p.top1_agreement,
                    p.reverse_kl,
                )
            })
            .collect();
        let want: Vec<(u64, f64, f64, f64)> = (0..3)
            .map(|i| (i as u64 * 4100, kl[i], top1[i], kl[i] * 0.7))
            .collect();
        assert_eq!(got, want, "{}", m.name);
    }
    assert_eq!(report.methods[1].train_seconds, Some(245.0));
    assert_eq!(report.cost.len(), 1);
    assert_eq!(report.cost[0].bytes_per_position, 62.5);
    assert_eq!(report.cost[0].dump.bytes, 25000);
    assert_eq!(report.cost[0].dump_seconds, 123.4);
    let raw: serde_json::Value = serde_json::from_str(&read(dir, "results.json")).unwrap();
    assert_eq!(
        raw["methods"][2]["curve"][1]["train_positions"],
        json!(4100)
    );

    // side-by-side.md: prompts in the first method's order, every method's response, fences
    // that survive backticks in the text.
    let sbs = read(dir, "side-by-side.md");
    let order: Vec<usize> = ["seed_task_3", "seed_task_1", "seed_task_2"]
        .iter()
        .map(|id| sbs.find(&format!("`{id}`")).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{sbs}");
    for id in ["seed_task_3", "seed_task_1", "seed_task_2"] {
        assert!(sbs.contains(&format!("SFT says {id}")), "{id}");
        assert!(sbs.contains(&format!("FKL says {id}")), "{id}");
    }
    assert!(sbs.contains("### SFT on teacher responses (α = 0)\n"));
    assert!(sbs.contains("### forward KL, top-8 | bucket\n"));
    assert!(
        sbs.contains("````text\nWrite `ls` in a fence:\n```sh\nls\n```\n````\n"),
        "{sbs}"
    );

    // The plots: PNGs of the right size with something drawn on them.
    for name in ["kl.png", "top1.png", "cost.png"] {
        let inked = check_png(&dir.join("results").join(name), 1000, 600);
        assert!(inked > 5_000, "{name}: only {inked} non-white pixels");
    }

    // A second run overwrites in place and leaves no temporary files.
    write_report(dir, &Options::default()).unwrap();
    let mut entries: Vec<String> = std::fs::read_dir(dir.join("results"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            "cost.png",
            "kl.png",
            "metrics.csv",
            "results.json",
            "results.md",
            "side-by-side.md",
            "top1.png"
        ]
    );
}

#[test]
fn max_prompts_limits_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    write_study(tmp.path());
    write_report(tmp.path(), &Options { max_prompts: 1 }).unwrap();
    let sbs = read(tmp.path(), "side-by-side.md");
    assert!(sbs.contains("SFT says seed_task_3") && sbs.contains("FKL says seed_task_3"));
    assert!(
        !sbs.contains("seed_task_1") && !sbs.contains("seed_task_2"),
        "{sbs}"
    );
}

#[test]
fn empty_study_still_reports() {
    let tmp = tempfile::tempdir().unwrap();
    util::write_json(
        tmp.path(),
        "study.json",
        &json!({"title": "empty", "machine": "m", "command": "c", "methods": [], "cost": []}),
    );
    let written = write_report(tmp.path(), &Options::default()).unwrap();
    assert!(!written.iter().any(|p| p.ends_with("cost.png")));
    check_png(&tmp.path().join("results/kl.png"), 1000, 600);
    let md = read(tmp.path(), "results.md");
    assert!(
        !md.contains("cost.png") && !md.contains("side-by-side.md"),
        "{md}"
    );
}

#[test]
fn malformed_metrics_line_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_study(dir);
    let good = std::fs::read_to_string(dir.join("runs/sft/metrics.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(2, "{\"step\": 7, \"loss\": }");
    write_text(dir, "runs/sft/metrics.jsonl", &(lines.join("\n") + "\n"));

    let r = write_report(dir, &Options::default());
    match r {
        Err(Error::JsonLine { path, line: 3, .. }) => {
            assert!(
                path.ends_with("runs/sft/metrics.jsonl"),
                "{}",
                path.display()
            )
        }
        other => panic!("expected a JSON line error at line 3, got {other:?}"),
    }
    assert!(!dir.join("results").exists(), "nothing is written on error");

    // The binary prints the file and line and exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_study-report"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("runs/sft/metrics.jsonl:3: expected value at column 21"),
        "{stderr}"
    );
}

#[test]
fn run_without_eval_lines_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_study(dir);
    write_jsonl(
        dir,
        "runs/forward_kl/metrics.jsonl",
        &[json!({"step": 1, "loss": 2.0, "train_positions": 410})],
    );
    let r = write_report(dir, &Options::default());
    assert!(
        matches!(&r, Err(Error::NoEvalLines { path }) if path.ends_with("runs/forward_kl/metrics.jsonl")),
        "{r:?}"
    );
}

#[test]
fn missing_eval_json_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_study(dir);
    std::fs::remove_file(dir.join("evals/sft/eval.json")).unwrap();
    let r = write_report(dir, &Options::default());
    assert!(
        matches!(&r, Err(Error::Io { path, .. }) if path.ends_with("evals/sft/eval.json")),
        "{r:?}"
    );
}

#[test]
fn cli_prints_written_paths_and_documents_flags() {
    let tmp = tempfile::tempdir().unwrap();
    write_study(tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_study-report"))
        .arg(tmp.path())
        .args(["--max-prompts", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 7, "{stdout}");
    assert!(stdout.lines().all(|l| Path::new(l).is_file()), "{stdout}");

    let help = Command::new(env!("CARGO_BIN_EXE_study-report"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.contains("--max-prompts <N>") && help.contains("[default: 6]"),
        "{help}"
    );
}

#[test]
fn two_students_get_their_own_tables_and_plots_with_answer_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_study(dir);
    // The same study, with the trained methods split over two students, answers scored in
    // one evaluation, and a labelled cost entry of its own series.
    let mut study: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("study.json")).unwrap()).unwrap();
    study["methods"][1]["student"] = json!("6 of 30 layers");
    study["methods"][2]["student"] = json!("15 of 30 layers");
    study["cost"][0]["label"] = json!("sample:12");
    study["cost"][0]["series"] = json!("sampled");
    study["cost"][0]["note"] = json!("3.9 distinct ids");
    util::write_json(dir, "study.json", &study);
    let mut e = util::eval(3000, 3.5, 2.25, 0.3456, 4.5);
    e["answers"] = json!({"count": 30, "rouge_l_f1": 0.4125, "answered_share": 0.9,
                          "empty_share": 0.0, "mean_tokens": 50.0,
                          "teacher_mean_tokens": 40.0, "length_ratio": 1.25});
    util::write_json(dir, "evals/sft/eval.json", &e);
    let mut lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("evals/sft/generations.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    lines[0]["rouge_l_f1"] = json!(0.25);
    lines[0]["ended"] = json!(false);
    write_jsonl(dir, "evals/sft/generations.jsonl", &lines);

    let written = write_report(dir, &Options::default()).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // Three groups: the initialisation names no student, then the two students.
    for name in ["kl-1.png", "kl-2.png", "kl-3.png", "top1-3.png"] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
        assert!(check_png(&dir.join("results").join(name), 1000, 600) > 1000);
    }
    assert!(!names.iter().any(|n| n == "kl.png"), "{names:?}");

    let md = read(dir, "results.md");
    let six = md.find("## Student: 6 of 30 layers").expect(&md);
    let fifteen = md.find("## Student: 15 of 30 layers").expect(&md);
    assert!(six < fifteen);
    // Only the 6-layer table has answer columns, and SFT's scores are in it.
    let six_part = &md[six..fifteen];
    assert!(
        six_part.contains("ROUGE-L F1 | answered | length ÷ teacher |"),
        "{six_part}"
    );
    assert!(
        six_part.contains("| 8,200 | 4 min 05 s | 0.412 | 90% | 1.25 |"),
        "{six_part}"
    );
    assert!(six_part.contains("](kl-2.png)") && six_part.contains("](top1-2.png)"));
    assert!(!md[fifteen..].contains("ROUGE-L F1 |"));
    assert!(md.contains("| sample:12 | 62.5 | 2 min 03 s | 2.000 | 0.5000 | 3.9 distinct ids |"));

    let csv = read(dir, "metrics.csv");
    assert!(
        csv.contains("method,sft,SFT on teacher responses (α = 0),6 of 30 layers,3.5,2.25,0.3456,4.5,3000,8200,245,0.4125,0.9,1.25\n"),
        "{csv}"
    );
    assert!(csv.contains("cost,k8-bucket,sample:12,,2,"), "{csv}");

    let sbs = read(dir, "side-by-side.md");
    assert!(
        sbs.contains("### 6 of 30 layers: SFT on teacher responses (α = 0)"),
        "{sbs}"
    );
    assert!(
        sbs.contains("ROUGE-L F1 0.250; no end-of-turn within the limit"),
        "{sbs}"
    );
}
