//! Text renderings of a [`Report`]: `metrics.csv`, `results.md` and `side-by-side.md`.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::report::{MethodGenerations, MethodResult, Report};
use crate::study::{EvalMetrics, Generation};

/// The files `results.md` links to, as file names relative to it (`kl.png`); `None` for a
/// file that was not written.
#[derive(Debug, Clone, Default)]
pub struct Links {
    /// Per student (in [`Report::students`] order): held-out forward KL against training
    /// positions.
    pub kl: Vec<String>,
    /// Per student: top-1 agreement against training positions.
    pub top1: Vec<String>,
    /// Bytes per position and held-out KL against k.
    pub cost: Option<String>,
    /// Teacher and student responses side by side.
    pub side_by_side: Option<String>,
}

/// `metrics.csv`: a header and one row per method, then one per cost-study variant (`kind`
/// says which). Floats are written in full precision (shortest round-trip form); a missing
/// `train_seconds` is an empty cell. Quoting follows RFC 4180.
pub fn metrics_csv(report: &Report) -> String {
    let mut out = String::from(
        "kind,name,label,student,forward_kl,reverse_kl,top1_agreement,nll,eval_positions,train_positions,train_seconds,rouge_l_f1,answered_share,length_ratio\n",
    );
    for m in &report.methods {
        csv_row(
            &mut out,
            [
                "method",
                &m.name,
                &m.label,
                m.student.as_deref().unwrap_or(""),
            ],
            &m.eval,
            m.train_positions,
            m.train_seconds,
        );
    }
    for c in &report.cost {
        csv_row(
            &mut out,
            ["cost", &c.name, &c.label, ""],
            &c.eval,
            c.train_positions,
            c.train_seconds,
        );
    }
    out
}

/// Appends one `metrics.csv` row.
fn csv_row(
    out: &mut String,
    [kind, name, label, student]: [&str; 4],
    e: &EvalMetrics,
    train_positions: u64,
    train_seconds: Option<f64>,
) {
    let a = e.answers.as_ref();
    let fields = [
        kind.to_string(),
        name.to_string(),
        label.to_string(),
        student.to_string(),
        e.forward_kl.to_string(),
        e.reverse_kl.to_string(),
        e.top1_agreement.to_string(),
        e.nll.to_string(),
        e.positions.to_string(),
        train_positions.to_string(),
        train_seconds.map(|s| s.to_string()).unwrap_or_default(),
        a.map(|a| a.rouge_l_f1.to_string()).unwrap_or_default(),
        a.map(|a| a.answered_share.to_string()).unwrap_or_default(),
        a.and_then(|a| a.length_ratio)
            .map(|r| r.to_string())
            .unwrap_or_default(),
    ];
    let quoted: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    out.push_str(&quoted.join(","));
    out.push('\n');
}

/// One CSV field, quoted (with `"` doubled) when it holds a comma, quote, line break or
/// leading/trailing space.
fn csv_field(s: &str) -> String {
    let needs_quotes = s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ');
    if needs_quotes {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `results.md`: the methods table, the plots, the cost table, a link to the side-by-side
/// generations and where the study ran.
///
/// KL and NLL are shown with 3 decimals, top-1 agreement with 4, positions with thousands
/// separators, times as `12.3 s` / `4 min 05 s` / `1 h 02 min`.
pub fn results_markdown(report: &Report, links: &Links) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", one_line(&report.title));
    if report.methods.is_empty() {
        md.push_str("The study lists no methods.\n\n");
    }
    let students = report.students();
    for (i, student) in students.iter().enumerate() {
        let methods: Vec<&MethodResult> = report
            .methods
            .iter()
            .filter(|m| &m.student == student)
            .collect();
        if let (Some(name), true) = (student, students.len() > 1) {
            let _ = writeln!(md, "## Student: {}\n", one_line(name));
        }
        if !methods.is_empty() {
            methods_table(&mut md, &methods);
        }
        if let Some(kl) = links.kl.get(i) {
            let _ = writeln!(
                md,
                "![Held-out forward KL against training positions]({kl})\n"
            );
        }
        if let Some(top1) = links.top1.get(i) {
            let _ = writeln!(
                md,
                "![Held-out top-1 agreement against training positions]({top1})\n"
            );
        }
    }
    if !report.cost.is_empty() {
        md.push_str("## Cost of the teacher cache\n\n");
        md.push_str(
            "| cache | bytes per distilled position | dump time | held-out forward KL reached | top-1 agreement | note |\n\
             | --- | ---: | ---: | ---: | ---: | --- |\n",
        );
        for c in &report.cost {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {} | {:.3} | {:.4} | {} |",
                table_cell(&c.label),
                c.bytes_per_position,
                duration(c.dump_seconds),
                c.eval.forward_kl,
                c.eval.top1_agreement,
                table_cell(c.note.as_deref().unwrap_or("")),
            );
        }
        md.push('\n');
        if let Some(cost) = &links.cost {
            let _ = writeln!(
                md,
                "![Bytes per distilled position and held-out forward KL against k]({cost})\n"
            );
        }
    }
    if let Some(sbs) = &links.side_by_side {
        let _ = writeln!(
            md,
            "Teacher and student responses to the same held-out prompts: [{sbs}]({sbs}).\n"
        );
    }
    let _ = writeln!(
        md,
        "Machine: {}. Command: {}",
        one_line(&report.machine),
        code_span(&report.command)
    );
    md
}

/// One student's methods table; the answer columns appear when any method has scored answers.
fn methods_table(md: &mut String, methods: &[&MethodResult]) {
    let mut eval_positions: Vec<u64> = methods.iter().map(|m| m.eval.positions).collect();
    eval_positions.sort_unstable();
    eval_positions.dedup();
    let on = match eval_positions.as_slice() {
        [n] => format!("{} held-out positions", thousands(*n)),
        _ => "held-out positions (counts differ by method: see metrics.csv)".to_string(),
    };
    let answers = methods.iter().find_map(|m| m.eval.answers);
    let _ = write!(
        md,
        "Final metrics on {on}; KL and NLL in nats per position, top-1 agreement as a fraction."
    );
    if let Some(a) = answers {
        let _ = write!(
            md,
            " Greedy answers to {} held-out prompts: ROUGE-L F1 against the teacher's answer, \
             the share that are non-empty and end with the end-of-turn token, and mean length \
             against the teacher's.",
            a.count
        );
    }
    md.push_str("\n\n");
    md.push_str(
        "| method | held-out forward KL | reverse KL | top-1 agreement | NLL | training positions | time |",
    );
    if answers.is_some() {
        md.push_str(" ROUGE-L F1 | answered | length ÷ teacher |");
    }
    md.push_str("\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    if answers.is_some() {
        md.push_str(" ---: | ---: | ---: |");
    }
    md.push('\n');
    for m in methods {
        let _ = write!(
            md,
            "| {} | {:.3} | {:.3} | {:.4} | {:.3} | {} | {} |",
            table_cell(&m.label),
            m.eval.forward_kl,
            m.eval.reverse_kl,
            m.eval.top1_agreement,
            m.eval.nll,
            thousands(m.train_positions),
            m.train_seconds.map_or("–".to_string(), duration),
        );
        if answers.is_some() {
            match m.eval.answers {
                Some(a) => {
                    let _ = write!(
                        md,
                        " {:.3} | {:.0}% | {} |",
                        a.rouge_l_f1,
                        100.0 * a.answered_share,
                        a.length_ratio
                            .map_or("–".to_string(), |r| format!("{r:.2}")),
                    );
                }
                None => md.push_str(" – | – | – |"),
            }
        }
        md.push('\n');
    }
    md.push('\n');
}

/// `side-by-side.md`: for each prompt id (in the order of the first method with generations,
/// at most `max_prompts`), the prompt, the teacher's response and each method's student
/// response under a heading with the method's label. Texts go in fenced blocks whose fence
/// is longer than any backtick run inside, so no text can break out.
pub fn side_by_side_markdown(
    title: &str,
    methods: &[MethodGenerations],
    max_prompts: usize,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Side by side: {}\n", one_line(title));
    let Some(first) = methods.first() else {
        md.push_str("No method has a `generations.jsonl`.\n");
        return md;
    };
    let by_id: Vec<HashMap<&str, &Generation>> = methods
        .iter()
        .map(|m| {
            let mut map = HashMap::new();
            for g in &m.generations {
                map.entry(g.id.as_str()).or_insert(g);
            }
            map
        })
        .collect();
    let mut ids: Vec<&str> = Vec::new();
    for g in &first.generations {
        if !ids.contains(&g.id.as_str()) {
            ids.push(&g.id);
        }
    }
    let shown = ids.len().min(max_prompts);
    let _ = writeln!(
        md,
        "{shown} of {} prompts, in the order of the generations of \"{}\": the prompt, the \
         teacher's response, then each method's student response.\n",
        ids.len(),
        one_line(&first.label),
    );
    for (n, id) in ids.iter().take(max_prompts).enumerate() {
        let g0 = by_id[0][id];
        let _ = writeln!(md, "## {}. {}\n", n + 1, code_span(id));
        md.push_str("**Prompt**\n\n");
        md.push_str(&fenced(&g0.prompt));
        md.push_str("**Teacher**\n\n");
        md.push_str(&fenced(&g0.teacher));
        for (m, map) in methods.iter().zip(&by_id) {
            let _ = writeln!(md, "### {}\n", one_line(&m.label));
            match map.get(id) {
                Some(g) => {
                    if let (Some(r), Some(ended)) = (g.rouge_l_f1, g.ended) {
                        let _ = writeln!(
                            md,
                            "ROUGE-L F1 {r:.3}; {}\n",
                            if ended {
                                "ends with end-of-turn"
                            } else {
                                "no end-of-turn within the limit"
                            }
                        );
                    }
                    md.push_str(&fenced(&g.student));
                }
                None => md.push_str("_No generation for this prompt._\n\n"),
            }
        }
    }
    md
}

/// `text` in a fenced code block, followed by a blank line. The fence is one backtick longer
/// than the longest backtick run in `text` (at least three), so CommonMark cannot end it early.
fn fenced(text: &str) -> String {
    let fence = "`".repeat(longest_backtick_run(text).max(2) + 1);
    let body = text.strip_suffix('\n').unwrap_or(text);
    format!("{fence}text\n{body}\n{fence}\n\n")
}

/// An inline code span holding `text` verbatim (CommonMark: delimiters longer than any
/// backtick run inside, padded with spaces when the text starts or ends with a backtick).
fn code_span(text: &str) -> String {
    let text = one_line(text);
    let ticks = "`".repeat(longest_backtick_run(&text) + 1);
    if text.starts_with('`') || text.ends_with('`') {
        format!("{ticks} {text} {ticks}")
    } else {
        format!("{ticks}{text}{ticks}")
    }
}

fn longest_backtick_run(text: &str) -> usize {
    let (mut best, mut run) = (0, 0);
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

/// `text` on one line: line breaks become spaces (for headings and table cells).
fn one_line(text: &str) -> String {
    text.split(['\r', '\n']).collect::<Vec<_>>().join(" ")
}

/// `text` as a Markdown table cell: on one line, with `|` escaped.
fn table_cell(text: &str) -> String {
    one_line(text).replace('|', "\\|")
}

/// An integer with `,` between groups of three digits: `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds for people: `12.3 s` below a minute, `4 min 05 s` below an hour, else `1 h 02 min`.
pub(crate) fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return format!("{seconds} s");
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let total = seconds.round() as u64;
    if total < 3600 {
        format!("{} min {:02} s", total / 60, total % 60)
    } else {
        let minutes = (seconds / 60.0).round() as u64;
        format!("{} h {:02} min", minutes / 60, minutes % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting_follows_rfc_4180() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("SFT (α = 0), short"), "\"SFT (α = 0), short\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

    #[test]
    fn fences_outlast_backticks_in_the_text() {
        assert_eq!(fenced("a\n"), "```text\na\n```\n\n");
        let f = fenced("x ```rust\ny\n``` z");
        assert!(
            f.starts_with("````text\n") && f.ends_with("\n````\n\n"),
            "{f}"
        );
        assert_eq!(code_span("seed_1"), "`seed_1`");
        assert_eq!(code_span("a`b"), "``a`b``");
        assert_eq!(code_span("`a"), "`` `a ``");
    }

    #[test]
    fn numbers_for_people() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(8200), "8,200");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(duration(12.34), "12.3 s");
        assert_eq!(duration(245.0), "4 min 05 s");
        assert_eq!(duration(3725.0), "1 h 02 min");
        assert_eq!(table_cell("a|b\nc"), "a\\|b c");
    }
}
