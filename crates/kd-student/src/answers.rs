//! What a user sees of a student: its greedy answers to held-out prompts, scored against the
//! teacher's answers to the same prompts.
//!
//! - **ROUGE-L F1** between the student's and the teacher's answer, on words as the
//!   `rouge-score` package's default tokenizer makes them (lower-cased, every run of
//!   characters outside `[a-z0-9]` a separator, no stemming): with `L` the length of the
//!   longest common subsequence of the two word lists, precision `L / |student|`, recall
//!   `L / |teacher|`, F1 their harmonic mean, and 0 when either list is empty.
//! - **Answered**: the answer is non-empty and ends with an end-of-turn token within the
//!   generation limit (an answer cut off by the limit, or an immediate end-of-turn, is not).
//! - **Length**: the answer's tokens before the end-of-turn token, against the teacher's.

use serde::{Deserialize, Serialize};

/// Words of `text` as `rouge-score`'s default tokenizer makes them: lower-cased, split at
/// every run of characters outside `[a-z0-9]`.
pub fn rouge_words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence of `a` and `b` (one row of the table at a time).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F1 of `candidate` against `reference` (see the module docs); 0 when either has
/// no words.
pub fn rouge_l_f1(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (rouge_words(candidate), rouge_words(reference));
    if c.is_empty() || r.is_empty() {
        return 0.0;
    }
    let l = lcs_len(&c, &r) as f64;
    if l == 0.0 {
        return 0.0;
    }
    let (p, rec) = (l / c.len() as f64, l / r.len() as f64);
    2.0 * p * rec / (p + rec)
}

/// One answer's scores, as `student-fit eval` writes them beside the texts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnswerScores {
    /// ROUGE-L F1 against the teacher's answer.
    pub rouge_l_f1: f64,
    /// The student's tokens before its end-of-turn token (all of them when it has none).
    pub student_tokens: usize,
    /// The teacher's tokens before its end-of-turn token.
    pub teacher_tokens: usize,
    /// The student's answer ended with an end-of-turn token within the limit.
    pub ended: bool,
    /// The student's answer has at least one non-blank character.
    pub non_empty: bool,
}

impl AnswerScores {
    /// Non-empty and ended: an answer a user would call an answer.
    pub fn answered(&self) -> bool {
        self.ended && self.non_empty
    }
}

/// Scores of one held-out answer from the two texts and the token counts.
pub fn score(
    student_text: &str,
    teacher_text: &str,
    student_tokens: usize,
    teacher_tokens: usize,
    ended: bool,
) -> AnswerScores {
    AnswerScores {
        rouge_l_f1: rouge_l_f1(student_text, teacher_text),
        student_tokens,
        teacher_tokens,
        ended,
        non_empty: !student_text.trim().is_empty(),
    }
}

/// The answers of one student, summarised (`answers` in `eval.json`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnswerSummary {
    /// Answers scored.
    pub count: usize,
    /// Mean ROUGE-L F1 against the teacher's answers.
    pub rouge_l_f1: f64,
    /// Share of answers that are non-empty and end with an end-of-turn token.
    pub answered_share: f64,
    /// Share of answers with no words at all.
    pub empty_share: f64,
    /// Mean answer length in tokens (before end-of-turn).
    pub mean_tokens: f64,
    /// Mean length of the teacher's answers to the same prompts.
    pub teacher_mean_tokens: f64,
    /// `mean_tokens / teacher_mean_tokens`; none when the teacher's answers are all empty.
    pub length_ratio: Option<f64>,
}

/// Summary of a student's answers; `None` when there are none.
pub fn summarise(scores: &[AnswerScores]) -> Option<AnswerSummary> {
    if scores.is_empty() {
        return None;
    }
    let n = scores.len() as f64;
    let mean = |f: &dyn Fn(&AnswerScores) -> f64| scores.iter().map(f).sum::<f64>() / n;
    let mean_tokens = mean(&|s| s.student_tokens as f64);
    let teacher_mean_tokens = mean(&|s| s.teacher_tokens as f64);
    Some(AnswerSummary {
        count: scores.len(),
        rouge_l_f1: mean(&|s| s.rouge_l_f1),
        answered_share: mean(&|s| f64::from(u8::from(s.answered()))),
        empty_share: mean(&|s| f64::from(u8::from(!s.non_empty))),
        mean_tokens,
        teacher_mean_tokens,
        length_ratio: (teacher_mean_tokens > 0.0).then(|| mean_tokens / teacher_mean_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_rouge_scores_tokenizer() {
        assert_eq!(
            rouge_words("The cat's 2 HATS—on mats!"),
            ["the", "cat", "s", "2", "hats", "on", "mats"]
        );
        assert!(rouge_words("… — !").is_empty());
        // Letters outside ASCII separate words, as `[^a-z0-9]+` does.
        assert_eq!(rouge_words("café au lait"), ["caf", "au", "lait"]);
    }

    #[test]
    fn lcs_is_the_longest_common_subsequence() {
        assert_eq!(lcs_len(b"ABCBDAB", b"BDCABA"), 4);
        assert_eq!(lcs_len(b"", b"abc"), 0);
        assert_eq!(lcs_len(b"abc", b"abc"), 3);
        assert_eq!(lcs_len(b"abc", b"def"), 0);
    }

    #[test]
    fn rouge_l_by_hand() {
        // Candidate 6 words, reference 7, LCS "the cat on the mat" = 5:
        // P = 5/6, R = 5/7, F1 = 2PR/(P+R) = 10/13.
        let f = rouge_l_f1("the cat sat on the mat", "the cat was lying on the mat");
        assert!((f - 10.0 / 13.0).abs() < 1e-12, "{f}");
        assert_eq!(rouge_l_f1("Same words.", "same WORDS"), 1.0);
        assert_eq!(rouge_l_f1("", "something"), 0.0);
        assert_eq!(rouge_l_f1("nothing shared", "at all"), 0.0);
        // Order matters: a reversed answer shares a subsequence of one word.
        let f = rouge_l_f1("c b a", "a b c");
        assert!((f - 1.0 / 3.0).abs() < 1e-12, "{f}");
    }

    #[test]
    fn summary_counts_answers_that_end_and_say_something() {
        let s = [
            score("the cat sat", "the cat sat", 3, 3, true),
            score("", "a reply", 0, 2, true),
            score("loop loop loop", "a reply", 128, 2, false),
            score("a reply", "a reply", 2, 3, true),
        ];
        assert!(s[0].answered() && !s[1].answered() && !s[2].answered() && s[3].answered());
        let m = summarise(&s).unwrap();
        assert_eq!(m.count, 4);
        assert_eq!(m.answered_share, 0.5);
        assert_eq!(m.empty_share, 0.25);
        assert_eq!(m.rouge_l_f1, (1.0 + 0.0 + 0.0 + 1.0) / 4.0);
        assert_eq!(m.mean_tokens, 133.0 / 4.0);
        assert_eq!(m.teacher_mean_tokens, 10.0 / 4.0);
        assert!((m.length_ratio.unwrap() - 13.3).abs() < 1e-12);
        assert_eq!(summarise(&[]), None);
    }
}
