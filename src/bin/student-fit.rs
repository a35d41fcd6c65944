//! `student-fit`: train a student from teacher-logit shards alone (no teacher in memory),
//! evaluate it, and print its logits for an outside check.

fn main() {
    kd_distill::cli::student_fit::main()
}
