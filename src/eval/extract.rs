//! Answer extraction: from a generation to a normalized answer that compares by string equality
//! with the gold answer normalized the same way.
//!
//! - GSM8K: the number after the first "The answer is" (case-insensitive), else the last number of
//!   the generation (lm-evaluation-harness's strict then flexible match). Numbers may carry a sign
//!   (`-` or U+2212), a dollar sign, thousands separators in groups of three (`1,234`) and a
//!   decimal part; they are compared as values (`canonical_number`: `72.00` and `72` are equal).
//! - BBH: the text after the first "the answer is" up to the end of its line, normalized by the
//!   task's `AnswerKind`; when the phrase is absent, the kind's last candidate in the whole
//!   generation (the last `(X)`, the last yes/no, ...), except free text, which then has none.
//! - MMLU chain of thought: as a BBH multiple-choice answer, reduced to its letter `A`-`D`.

use std::sync::LazyLock;

use regex::Regex;

/// How a BBH task's answers are written and compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerKind {
    /// A letter option written `(A)`: normalized to `(A)`.
    Choice,
    /// `Yes`/`No` (any case): normalized to `yes`/`no`.
    YesNo,
    /// `True`/`False`: normalized to `true`/`false`.
    TrueFalse,
    /// `valid`/`invalid`.
    Validity,
    /// A number: normalized by `canonical_number`.
    Number,
    /// Words (word sorting): lowercased, whitespace collapsed, a final period dropped.
    Words,
    /// A sequence of symbols (Dyck languages): whitespace removed, a final period dropped.
    Symbols,
}

impl AnswerKind {
    /// The kind of each of the 27 BBH tasks; `None` for a name outside them.
    pub fn of_bbh_task(task: &str) -> Option<AnswerKind> {
        use AnswerKind::*;
        Some(match task {
            "boolean_expressions" => TrueFalse,
            "causal_judgement" | "navigate" | "sports_understanding" | "web_of_lies" => YesNo,
            "formal_fallacies" => Validity,
            "multistep_arithmetic_two" | "object_counting" => Number,
            "word_sorting" => Words,
            "dyck_languages" => Symbols,
            "date_understanding"
            | "disambiguation_qa"
            | "geometric_shapes"
            | "hyperbaton"
            | "logical_deduction_five_objects"
            | "logical_deduction_seven_objects"
            | "logical_deduction_three_objects"
            | "movie_recommendation"
            | "penguins_in_a_table"
            | "reasoning_about_colored_objects"
            | "ruin_names"
            | "salient_translation_error_detection"
            | "snarks"
            | "temporal_sequences"
            | "tracking_shuffled_objects_five_objects"
            | "tracking_shuffled_objects_seven_objects"
            | "tracking_shuffled_objects_three_objects" => Choice,
            _ => return None,
        })
    }

    /// The kind that fits every gold target of a task (for a task outside the 27): the first of
    /// choice, yes/no, true/false, valid/invalid, number that normalizes every target to itself,
    /// else words.
    pub fn infer(targets: &[&str]) -> AnswerKind {
        use AnswerKind::*;
        for kind in [Choice, YesNo, TrueFalse, Validity, Number] {
            if !targets.is_empty() && targets.iter().all(|t| kind.exact(t).is_some()) {
                return kind;
            }
        }
        Words
    }

    /// A gold target normalized, or `None` when it is not an answer of this kind.
    pub fn normalize_gold(self, target: &str) -> Option<String> {
        self.exact(target)
    }

    /// `s` as a whole, if it is exactly one answer of this kind (surrounding spaces and a final
    /// period aside).
    fn exact(self, s: &str) -> Option<String> {
        let t = trim_answer(s);
        match self {
            AnswerKind::Choice => {
                let c = CHOICE_EXACT.captures(t)?;
                Some(format!("({})", c[1].to_ascii_uppercase()))
            }
            AnswerKind::YesNo => word_in(t, &["yes", "no"]),
            AnswerKind::TrueFalse => word_in(t, &["true", "false"]),
            AnswerKind::Validity => word_in(t, &["invalid", "valid"]),
            AnswerKind::Number => {
                let ns = numbers(t);
                match ns.as_slice() {
                    [n] if n.start == 0 && n.end == t.len() => Some(canonical_number(n.value)),
                    _ => None,
                }
            }
            AnswerKind::Words | AnswerKind::Symbols => self.free_text(t),
        }
    }

    /// The answer this kind finds in an answer phrase's text (what follows "the answer is"):
    /// its first candidate.
    fn first_in(self, s: &str) -> Option<String> {
        match self {
            AnswerKind::Choice => first_choice(s),
            AnswerKind::YesNo => first_word(s, &["yes", "no"]),
            AnswerKind::TrueFalse => first_word(s, &["true", "false"]),
            AnswerKind::Validity => first_word(s, &["invalid", "valid"]),
            AnswerKind::Number => numbers(s).first().map(|n| canonical_number(n.value)),
            AnswerKind::Words | AnswerKind::Symbols => self.free_text(s),
        }
    }

    /// The last candidate anywhere in a generation without an answer phrase (none for free text).
    fn last_in(self, s: &str) -> Option<String> {
        match self {
            AnswerKind::Choice => CHOICE_PAREN.captures_iter(s).last().map(|c| format!("({})", c[1].to_ascii_uppercase())),
            AnswerKind::YesNo => last_word(s, &["yes", "no"]),
            AnswerKind::TrueFalse => last_word(s, &["true", "false"]),
            AnswerKind::Validity => last_word(s, &["invalid", "valid"]),
            AnswerKind::Number => numbers(s).last().map(|n| canonical_number(n.value)),
            AnswerKind::Words | AnswerKind::Symbols => None,
        }
    }

    fn free_text(self, s: &str) -> Option<String> {
        let t = trim_answer(s);
        let out = match self {
            AnswerKind::Symbols => t.chars().filter(|c| !c.is_whitespace()).collect::<String>(),
            _ => t.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase(),
        };
        (!out.is_empty()).then_some(out)
    }
}

/// `s` without surrounding whitespace, quotes, or a final period.
fn trim_answer(s: &str) -> &str {
    let t = s.trim();
    let t = t.strip_suffix('.').unwrap_or(t).trim();
    let t = t.trim_matches(|c| matches!(c, '"' | '\'' | '`' | '*' | '“' | '”')).trim();
    t.strip_suffix('.').unwrap_or(t).trim()
}

static ANSWER_PHRASE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)the answer is\b[:\s]*").expect("regex"));
static CHOICE_EXACT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\(?([A-Za-z])\)?$").expect("regex"));
static CHOICE_PAREN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\(([A-Za-z])\)").expect("regex"));
/// A bare option letter opening an answer phrase: `B`, `B.`, `B)`, `B:` but not the article `A
/// ...` followed by a word, nor a letter inside a word.
static CHOICE_BARE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^([A-Z])(?:[.):,]|\s*$)").expect("regex"));
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[-\u{2212}]?\$?[-\u{2212}]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?").expect("regex")
});

fn first_choice(s: &str) -> Option<String> {
    let t = s.trim_start();
    if let Some(c) = CHOICE_PAREN.captures(t.lines().next().unwrap_or("")) {
        return Some(format!("({})", c[1].to_ascii_uppercase()));
    }
    CHOICE_BARE.captures(t).map(|c| format!("({})", &c[1]))
}

/// The options found as whole words in `s` (case-insensitive), lowercased, left to right.
fn option_words(s: &str, options: &[&str]) -> Vec<String> {
    let re = Regex::new(&format!(r"(?i)\b(?:{})\b", options.join("|"))).expect("option words form a valid regex");
    re.find_iter(s).map(|m| m.as_str().to_lowercase()).collect()
}

fn first_word(s: &str, options: &[&str]) -> Option<String> {
    option_words(s, options).into_iter().next()
}

fn last_word(s: &str, options: &[&str]) -> Option<String> {
    option_words(s, options).pop()
}

/// `t` lowercased, if it is one of `options`.
fn word_in(t: &str, options: &[&str]) -> Option<String> {
    let w = t.to_lowercase();
    options.iter().find(|o| w == **o).map(|o| o.to_string())
}

/// A number found in a text, with its byte span.
#[derive(Clone, Debug, PartialEq)]
pub struct Number {
    pub start: usize,
    pub end: usize,
    pub value: f64,
}

/// Every number in `s`, left to right. A minus sign right after a letter or digit is a hyphen or
/// an operator (`5-3`), not a sign.
pub fn numbers(s: &str) -> Vec<Number> {
    NUMBER
        .find_iter(s)
        .filter_map(|m| {
            let mut start = m.start();
            let mut text = m.as_str();
            let prev = s[..start].chars().next_back();
            if text.starts_with(['-', '\u{2212}']) && prev.is_some_and(char::is_alphanumeric) {
                let c = text.chars().next().map_or(1, char::len_utf8);
                start += c;
                text = &text[c..];
            }
            let negative = text.contains(['-', '\u{2212}']);
            let digits: String = text.chars().filter(|c| c.is_ascii_digit() || *c == '.').collect();
            let v: f64 = digits.parse().ok()?;
            Some(Number { start, end: m.end(), value: if negative { -v } else { v } })
        })
        .collect()
}

/// A number written the same way whatever its source: integers without a decimal part, others
/// in Rust's shortest round-trip form; `-0` is `0`.
pub fn canonical_number(x: f64) -> String {
    let x = if x == 0.0 { 0.0 } else { x };
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// GSM8K's gold answer: the number after `####`.
pub fn gsm8k_gold(answer: &str) -> Option<String> {
    let (_, tail) = answer.rsplit_once("####")?;
    let t = tail.trim();
    let ns = numbers(t);
    match ns.as_slice() {
        [n] if n.start == 0 && n.end == t.len() => Some(canonical_number(n.value)),
        _ => None,
    }
}

/// GSM8K: the number after the first "The answer is", else the last number.
pub fn extract_gsm8k(generation: &str) -> Option<String> {
    if let Some(m) = ANSWER_PHRASE.find(generation) {
        let rest = &generation[m.end()..];
        let line = rest.lines().next().unwrap_or("");
        if let Some(n) = numbers(line).first() {
            return Some(canonical_number(n.value));
        }
    }
    numbers(generation).last().map(|n| canonical_number(n.value))
}

/// BBH: the answer phrase's first candidate of `kind`, else the generation's last candidate.
pub fn extract_bbh(generation: &str, kind: AnswerKind) -> Option<String> {
    if let Some(m) = ANSWER_PHRASE.find(generation) {
        let rest = &generation[m.end()..];
        let line = rest.lines().next().unwrap_or("");
        if let Some(a) = kind.first_in(line) {
            return Some(a);
        }
    }
    kind.last_in(generation)
}

/// MMLU with chain of thought: a letter `A`-`D` as a multiple-choice answer, without parentheses.
pub fn extract_mmlu_letter(generation: &str) -> Option<String> {
    let a = extract_bbh(generation, AnswerKind::Choice)?;
    let letter = a.trim_start_matches('(').trim_end_matches(')').to_string();
    matches!(letter.as_str(), "A" | "B" | "C" | "D").then_some(letter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use AnswerKind::*;

    fn g(s: &str) -> Option<String> {
        extract_gsm8k(s)
    }

    #[test]
    fn gsm8k_takes_the_answer_phrase_then_the_last_number() {
        assert_eq!(g("3 + 2 = 5. The answer is 5."), Some("5".into()));
        assert_eq!(g("He pays 2 * 9 = 18. The answer is 18 dollars.\n\nQ: Tom has 3"), Some("18".into()));
        assert_eq!(g("The answer is: 42"), Some("42".into()));
        assert_eq!(g("the answer is\n7"), Some("7".into()), "the phrase's line is empty: fall back to the last number");
        assert_eq!(g("First 12, then 15, so in total 27 apples"), Some("27".into()));
        assert_eq!(g("The answer is 4. Wait, 6 + 1 = 7"), Some("4".into()), "the first answer phrase wins");
        assert_eq!(g("No idea."), None);
        assert_eq!(g(""), None);
    }

    #[test]
    fn gsm8k_numbers_with_commas_dollars_signs_and_decimals() {
        assert_eq!(g("The answer is $1,234."), Some("1234".into()));
        assert_eq!(g("The answer is $18.00."), Some("18".into()));
        assert_eq!(g("The answer is -$5."), Some("-5".into()));
        assert_eq!(g("The answer is \u{2212}12"), Some("-12".into()), "Unicode minus");
        assert_eq!(g("The answer is 0.5 hours"), Some("0.5".into()));
        assert_eq!(g("so 5-3=2"), Some("2".into()));
        assert_eq!(g("the years 2019-2020"), Some("2020".into()), "a hyphen after a digit is no sign");
        assert_eq!(g("pages 1,2 and 3"), Some("3".into()), "1,2 is two numbers, not 12");
        assert_eq!(g("She earns 1,000,000 a year"), Some("1000000".into()));
        assert_eq!(g("Le résultat: 5 €, The answer is 5 €."), Some("5".into()));
        assert_eq!(g("🍎 × 3 = 🍎🍎🍎, The answer is 3 🍎"), Some("3".into()));
        assert_eq!(g("The answer is -0"), Some("0".into()));
    }

    #[test]
    fn gsm8k_gold_follows_the_hashes() {
        assert_eq!(gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72"), Some("72".into()));
        assert_eq!(gsm8k_gold("... #### 1,600"), Some("1600".into()));
        assert_eq!(gsm8k_gold("... #### -3"), Some("-3".into()));
        assert_eq!(gsm8k_gold("no hashes 5"), None);
        assert_eq!(gsm8k_gold("#### five"), None);
    }

    #[test]
    fn choices_accept_parentheses_or_a_bare_letter() {
        let b = |s: &str| extract_bbh(s, Choice);
        assert_eq!(b("So the answer is (B)."), Some("(B)".into()));
        assert_eq!(b("So the answer is B."), Some("(B)".into()));
        assert_eq!(b("So the answer is B) red"), Some("(B)".into()));
        assert_eq!(b("So the answer is (b) the red one"), Some("(B)".into()));
        assert_eq!(b("So the answer is A blue ball."), None, "an article is not an option");
        assert_eq!(b("Options (A) and (C) are wrong, so it must be (D) or maybe (E)"), Some("(E)".into()), "last (X) without a phrase");
        assert_eq!(b("So the answer is (A), not (B)."), Some("(A)".into()), "the phrase's first option");
        assert_eq!(b("So the answer is the second one.\nBetween (A) and (B)"), Some("(B)".into()), "no option after the phrase");
        assert_eq!(b("I cannot tell."), None);
        assert_eq!(extract_mmlu_letter("so the answer is (C)."), Some("C".into()));
        assert_eq!(extract_mmlu_letter("So the answer is (F)."), None, "MMLU has four options");
    }

    #[test]
    fn yes_no_true_false_valid_invalid() {
        assert_eq!(extract_bbh("So the answer is Yes.", YesNo), Some("yes".into()));
        assert_eq!(extract_bbh("So the answer is no, because", YesNo), Some("no".into()));
        assert_eq!(extract_bbh("Nobody knows. Yes, I think so", YesNo), Some("yes".into()), "'Nobody' is not 'no'");
        assert_eq!(extract_bbh("So the answer is False.", TrueFalse), Some("false".into()));
        assert_eq!(extract_bbh("So the answer is invalid.", Validity), Some("invalid".into()));
        assert_eq!(extract_bbh("The argument is valid. So the answer is valid", Validity), Some("valid".into()));
        assert_eq!(extract_bbh("the argument seems deductively invalid", Validity), Some("invalid".into()));
        assert_eq!(extract_bbh("So the answer is maybe.", YesNo), None);
        assert_eq!(extract_bbh("Ja. So the answer is NO.", YesNo), Some("no".into()));
    }

    #[test]
    fn numbers_and_free_text() {
        assert_eq!(extract_bbh("= -219. So the answer is -219.", Number), Some("-219".into()));
        assert_eq!(extract_bbh("So the answer is 8 objects.", Number), Some("8".into()));
        assert_eq!(extract_bbh("1 + 2 = 3", Number), Some("3".into()));
        assert_eq!(extract_bbh("So the answer is arson  Aspect census.\nQ:", Words), Some("arson aspect census".into()));
        assert_eq!(extract_bbh("So the answer is } ] >.", Symbols), Some("}]>".into()));
        assert_eq!(extract_bbh("We need to close ) and ]", Symbols), None, "free text needs the phrase");
        assert_eq!(extract_bbh("So the answer is \"zürich äpfel\".", Words), Some("zürich äpfel".into()));
    }

    #[test]
    fn gold_targets_normalize_by_kind() {
        assert_eq!(Choice.normalize_gold("(A)"), Some("(A)".into()));
        assert_eq!(YesNo.normalize_gold("yes"), Some("yes".into()));
        assert_eq!(YesNo.normalize_gold("Yes"), Some("yes".into()));
        assert_eq!(YesNo.normalize_gold("Yes indeed"), None);
        assert_eq!(Number.normalize_gold("-219"), Some("-219".into()));
        assert_eq!(Number.normalize_gold("12 apples"), None);
        assert_eq!(Symbols.normalize_gold("] ) }"), Some("])}".into()));
        assert_eq!(AnswerKind::infer(&["(A)", "(C)"]), Choice);
        assert_eq!(AnswerKind::infer(&["Yes", "no"]), YesNo);
        assert_eq!(AnswerKind::infer(&["3", "-4"]), Number);
        assert_eq!(AnswerKind::infer(&["apple banana"]), Words);
        for t in ["boolean_expressions", "word_sorting", "dyck_languages", "web_of_lies", "snarks"] {
            assert!(AnswerKind::of_bbh_task(t).is_some(), "{t}");
        }
        assert_eq!(AnswerKind::of_bbh_task("not_a_task"), None);
    }

    #[test]
    fn canonical_numbers() {
        assert_eq!(canonical_number(72.0), "72");
        assert_eq!(canonical_number(-0.0), "0");
        assert_eq!(canonical_number(2.5), "2.5");
        assert_eq!(canonical_number(0.1 + 0.2), "0.30000000000000004");
    }
}
