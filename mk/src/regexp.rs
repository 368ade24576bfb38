//! Plan 9 regular expressions (regexp(7), egrep-like) on top of the
//! `regex` crate, and `regsub`'s `\n` / `&` substitution.

use regex::Regex;

/// Translates a Plan 9 regular expression into `regex` syntax: braces
/// are literal, `\c` quotes `c` (`\n` is a newline), and class
/// characters `regex` treats specially are escaped.
pub fn translate(p9: &str) -> String {
    let mut out = String::with_capacity(p9.len() + 8);
    let mut it = p9.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\\' => match it.next() {
                Some('n') => out.push_str("\\n"),
                Some(d) => out.push_str(&regex::escape(&d.to_string())),
                None => out.push_str("\\\\"),
            },
            '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '[' => {
                out.push('[');
                if it.peek() == Some(&'^') {
                    out.push('^');
                    it.next();
                }
                if it.peek() == Some(&']') {
                    out.push_str("\\]");
                    it.next();
                }
                for d in it.by_ref() {
                    match d {
                        ']' => break,
                        '[' | '&' | '~' | '\\' => {
                            out.push('\\');
                            out.push(d);
                        }
                        _ => out.push(d),
                    }
                }
                out.push(']');
            }
            _ => out.push(c),
        }
    }
    out
}

/// Compiles a Plan 9 regular expression; the error is the compiler's
/// message.
pub fn compile(p9: &str) -> Result<Regex, String> {
    Regex::new(&translate(p9)).map_err(|e| {
        e.to_string()
            .lines()
            .last()
            .unwrap_or("bad regexp")
            .trim()
            .to_string()
    })
}

/// The match of a regular-expression rule: `stem0` (from the start of the
/// match to the end of the name, as 9base has it), the subexpressions for
/// `stem1`..`stem9`, and the spans for [`regsub`].
#[derive(Debug, Clone, Default)]
pub struct Matches {
    /// `stem0`..`stem9` as exported to recipes.
    pub stems: Vec<Option<String>>,
    /// The exact text of each group (group 0 is the whole match).
    pub groups: Vec<Option<String>>,
}

/// Searches `name` (unanchored, as Plan 9's `regexec`).
pub fn exec(re: &Regex, name: &str) -> Option<Matches> {
    let caps = re.captures(name)?;
    let mut stems = vec![None; 10];
    let mut groups = vec![None; 10];
    for (i, slot) in groups.iter_mut().enumerate() {
        *slot = caps.get(i).map(|m| m.as_str().to_string());
    }
    if let Some(m0) = caps.get(0) {
        stems[0] = Some(name[m0.start()..].to_string());
    }
    for (i, stem) in stems.iter_mut().enumerate().skip(1) {
        *stem = groups[i].clone();
    }
    Some(Matches { stems, groups })
}

/// Plan 9 `regsub`: `\0`..`\9` become the groups, `&` the whole match,
/// `\c` is `c`.
pub fn regsub(src: &str, m: &Matches) -> String {
    let group = |i: usize| m.groups.get(i).cloned().flatten().unwrap_or_default();
    let mut out = String::new();
    let mut it = src.chars();
    while let Some(c) = it.next() {
        match c {
            '\\' => match it.next() {
                Some(d @ '0'..='9') => out.push_str(&group(d as usize - '0' as usize)),
                Some(d) => out.push(d),
                None => {}
            },
            '&' => out.push_str(&group(0)),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translate_table() {
        let cases = [
            ("(.*)\\.o", "(.*)\\.o"),
            ("a{2}", "a\\{2\\}"),
            ("[a-z&]+", "[a-z\\&]+"),
            ("[]x]", "[\\]x]"),
            ("\\d", "d"),
        ];
        for (p9, want) in cases {
            assert_eq!(translate(p9), want, "{p9}");
        }
    }

    #[test]
    fn exec_and_regsub() {
        let re = compile("([a-z]+)/(.*)\\.o").expect("compiles");
        let m = exec(&re, "src/lib/a.o").expect("matches");
        assert_eq!(m.stems[0].as_deref(), Some("src/lib/a.o"));
        assert_eq!(m.stems[1].as_deref(), Some("src"));
        assert_eq!(m.stems[2].as_deref(), Some("lib/a"));
        assert_eq!(regsub("\\1/\\2.c", &m), "src/lib/a.c");
        assert_eq!(regsub("&.bak", &m), "src/lib/a.o.bak");
        assert!(exec(&re, "NOPE").is_none());
    }

    #[test]
    fn bad_regexp_is_an_error() {
        assert!(compile("(").is_err());
    }
}
