//! Property test of the parser and planner: any input, however mangled,
//! parses or fails with an error, and planning the default target in
//! question mode (nothing run) finishes; never a panic, never a hang.

use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use reprise_mk::{Commands, Evaluator, Mkfile, Options};

/// Time allowed for one case to parse and plan.
const DEADLINE: Duration = Duration::from_secs(5);

const TOKENS: &[&str] = &[
    "a",
    "b",
    "x.o",
    "x.c",
    "%",
    "&",
    ":",
    "=",
    "<",
    "<|",
    "|",
    "$",
    "{",
    "}",
    "${",
    "'",
    "\"",
    "`",
    "`{",
    "\\",
    "\n",
    "\t",
    " ",
    "#",
    "V",
    "Q",
    "R",
    "P",
    "N",
    "D",
    "E",
    "U",
    "n",
    "(",
    ")",
    ".*",
    "\\1",
    "'\\1'",
    "$X",
    "${X}",
    "${X:%=%.o}",
    "${X:a%b=c%d}",
    "X=",
    "X=U=",
    ":V:",
    ":R:",
    ":Pcmp:",
    "\n\t",
    "\r",
    "é",
    "*",
    "[",
    "]",
    "a:b",
    "%.o: %.c\n\techo $stem\n",
    "a: b\nb: a\n",
    "all:V: x.o\n",
    "\\\n",
    "$stem",
    "$target",
];

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(TOKENS).prop_map(str::to_string),
        1 => any::<String>(),
        1 => "[ -~\t\n]{0,8}",
    ]
}

fn mkfile_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(token(), 0..60).prop_map(|v| v.concat())
}

/// Parses `text` and plans its default target with nothing run; returns
/// a short description of the outcome.
fn parse_and_plan(text: String) -> String {
    let mut m = Mkfile::new(Vec::<(String, String)>::new(), Commands::Skip);
    if let Err(e) = m.parse_text("fuzz", &text, false) {
        return format!("parse error: {e}");
    }
    let targets = m
        .default_targets()
        .map(<[String]>::to_vec)
        .unwrap_or_default();
    let opts = Options {
        question: true,
        ..Options::default()
    };
    let mut ev = Evaluator::new(m, opts, Vec::new());
    let mut out = String::from("planned");
    for t in targets {
        if let Err(e) = ev.mk(&t) {
            out = format!("run error: {e}");
            break;
        }
    }
    out
}

fn within_deadline(text: String) -> Result<String, String> {
    let (tx, rx) = mpsc::channel();
    let input = text.clone();
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            let r = std::panic::catch_unwind(|| parse_and_plan(input));
            let _ = tx.send(r.map_err(|_| "panicked".to_string()));
        })
        .expect("spawn worker");
    match rx.recv_timeout(DEADLINE) {
        Ok(r) => r,
        Err(_) => Err(format!("no result within {DEADLINE:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_mkfiles_neither_panic_nor_hang(text in mkfile_text()) {
        // Run where no file the input names can exist.
        let r = within_deadline(text.clone());
        prop_assert!(r.is_ok(), "input {:?}: {:?}", text, r);
    }
}

#[test]
fn known_tricky_inputs() {
    let cases = [
        "",
        "\\",
        "'",
        "`",
        "${",
        "${X:",
        "a:",
        ":",
        "=",
        "<",
        "<|",
        "a:P",
        "a:Px",
        "%:%\n\tx\n",
        "&:&\n\tx\n",
        "(:R:\n\tx\n",
        "a: a\n\tx\n",
        "a:V: b\nb:V: a\n",
        "X=${X:%=%%}\n",
        "x: ${X:=}\n",
        "$\n",
        "a:\n#\n\t\n",
    ];
    for c in cases {
        let r = within_deadline(c.to_string());
        assert!(r.is_ok(), "input {c:?}: {r:?}");
    }
}
