//! Splitting a line into words: quotes, `$var`, `${var}` and
//! `${var:A%B=C%D}` substitutions, with 9base's quirks kept.

use crate::error::ParseError;
use crate::vars::Vars;

/// What word expansion needs: the variables, where we are (for syntax
/// errors) and a place for warnings.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    pub vars: &'a Vars,
    pub file: &'a str,
    pub line: usize,
    pub warnings: &'a mut Vec<String>,
}

impl Ctx<'_> {
    fn syntax(&self, msg: String) -> ParseError {
        ParseError::Syntax {
            file: self.file.to_string(),
            line: self.line,
            msg,
        }
    }

    fn warn(&mut self, msg: String) {
        let w = format!("mk: {}:{}: syntax error; {}", self.file, self.line, msg);
        self.warnings.push(w);
    }
}

/// Characters that may appear in a variable name.
pub fn is_wordchr(c: char) -> bool {
    c > ' ' && !"!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~".contains(c)
}

/// Byte index of the first character of `pat` in `s` that is not quoted,
/// escaped, or inside a `${...}`.
pub fn charin(s: &str, pat: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut vargen = false;
    let mut it = s.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        match c {
            '\\' => {
                it.next();
            }
            '\'' | '"' => {
                // Skip to the matching quote; a backslash escapes one char.
                let mut closed = false;
                while let Some((_, d)) = it.next() {
                    if d == c {
                        closed = true;
                        break;
                    }
                    if d == '\\' {
                        it.next();
                    }
                }
                if !closed {
                    return None;
                }
            }
            '$' => {
                if b.get(i + 1) == Some(&b'{') {
                    vargen = true;
                }
            }
            '}' => {
                if vargen {
                    vargen = false;
                } else if pat.contains(c) {
                    return Some(i);
                }
            }
            _ => {
                if !vargen && pat.contains(c) {
                    return Some(i);
                }
            }
        }
    }
    None
}

/// Splits `s` into words, expanding variables. An empty result is one
/// empty word, as in mk.
pub(crate) fn stow(ctx: &mut Ctx<'_>, s: &str) -> Result<Vec<String>, ParseError> {
    let mut out: Vec<String> = Vec::new();
    let mut pos = 0;
    while pos < s.len() {
        match nextword(ctx, s, &mut pos)? {
            Some(w) => out.extend(w),
            None => break,
        }
    }
    if out.is_empty() {
        out.push(String::new());
    }
    Ok(out)
}

fn next_char(s: &str, pos: &mut usize) -> Option<char> {
    let c = s[*pos..].chars().next()?;
    *pos += c.len_utf8();
    Some(c)
}

/// One word (or several, when a variable expands to several) from `s`
/// at `pos`; `None` when nothing is left (or, as in 9base, after an
/// empty quoted string).
fn nextword(
    ctx: &mut Ctx<'_>,
    s: &str,
    pos: &mut usize,
) -> Result<Option<Vec<String>>, ParseError> {
    let start = *pos;
    let mut buf = String::new();
    let mut words: Vec<String>;
    'restart: loop {
        words = Vec::new();
        while s[*pos..].starts_with([' ', '\t']) {
            *pos += 1;
        }
        let mut empty = true;
        while let Some(c) = next_char(s, pos) {
            match c {
                ' ' | '\t' | '\n' => break,
                '\\' | '\'' | '"' => {
                    empty = false;
                    if !expandquote(s, pos, c, &mut buf) {
                        return Err(ctx.syntax(format!("missing closing quote: {}", &s[start..])));
                    }
                }
                '$' => {
                    let Some(mut w) = varsub(ctx, s, pos)? else {
                        if empty {
                            continue 'restart;
                        }
                        continue;
                    };
                    empty = false;
                    if !buf.is_empty() {
                        w[0] = std::mem::take(&mut buf) + &w[0];
                    }
                    if let Some(last) = words.last_mut() {
                        let mut rest = w.into_iter();
                        if let Some(first) = rest.next() {
                            last.push_str(&first);
                        }
                        words.extend(rest);
                    } else {
                        words = w;
                    }
                }
                _ => {
                    empty = false;
                    buf.push(c);
                }
            }
        }
        break;
    }
    if !buf.is_empty() {
        match words.last_mut() {
            Some(last) => last.push_str(&buf),
            None => words.push(buf),
        }
    }
    Ok(if words.is_empty() { None } else { Some(words) })
}

/// Copies a quoted token into `buf`; `pos` is just after the opening
/// character. False if a quote is not closed.
fn expandquote(s: &str, pos: &mut usize, esc: char, buf: &mut String) -> bool {
    if esc == '\\' {
        if let Some(c) = next_char(s, pos) {
            buf.push(c);
        }
        return true;
    }
    while let Some(c) = next_char(s, pos) {
        if c == esc {
            return true;
        }
        if c == '\\' {
            buf.push(c);
            match next_char(s, pos) {
                Some(d) => buf.push(d),
                None => return false,
            }
            continue;
        }
        buf.push(c);
    }
    false
}

fn varname(ctx: &mut Ctx<'_>, s: &str, pos: &mut usize) -> Option<String> {
    let name: String = s[*pos..].chars().take_while(|&c| is_wordchr(c)).collect();
    if name.is_empty() {
        ctx.warn(format!("missing variable name <{}>", &s[*pos..]));
        return None;
    }
    *pos += name.len();
    Some(name)
}

/// The value of `name` if at least one of its words is not empty.
fn varmatch(ctx: &Ctx<'_>, name: &str) -> Option<Vec<String>> {
    let v = ctx.vars.get(name)?;
    v.value
        .iter()
        .any(|w| !w.is_empty())
        .then(|| v.value.clone())
}

/// Expands the variable reference after a `$` at `pos`.
fn varsub(ctx: &mut Ctx<'_>, s: &str, pos: &mut usize) -> Result<Option<Vec<String>>, ParseError> {
    if !s[*pos..].starts_with('{') {
        let Some(name) = varname(ctx, s, pos) else {
            return Ok(None);
        };
        return Ok(varmatch(ctx, &name));
    }
    let begin = *pos;
    *pos += 1;
    let Some(name) = varname(ctx, s, pos) else {
        return Ok(None);
    };
    if s[*pos..].starts_with('}') {
        *pos += 1;
        return Ok(varmatch(ctx, &name));
    }
    if !s[*pos..].starts_with(':') {
        ctx.warn(format!("bad variable name <{name}>"));
        return Ok(None);
    }
    let cp = *pos + 1;
    let Some(end) = charin(&s[cp..], "}").map(|e| e + cp) else {
        return Err(ctx.syntax(format!("missing '}}': {}", &s[begin..])));
    };
    *pos = end + 1;
    match ctx.vars.get(&name) {
        None => Ok(Some(vec![name])),
        Some(v) => {
            let v = v.value.clone();
            Ok(Some(subsub(ctx, &v, &s[cp..end])?))
        }
    }
}

fn is_percent(c: Option<u8>) -> bool {
    matches!(c, Some(b'%') | Some(b'&'))
}

/// The words of `pat[from..]` up to the first unquoted character of
/// `term` (`None` if that is at `from`), and where it stopped.
fn extractpat(
    ctx: &mut Ctx<'_>,
    pat: &str,
    from: usize,
    term: &str,
) -> Result<(Option<Vec<String>>, usize), ParseError> {
    let rest = &pat[from..];
    match charin(rest, term) {
        Some(0) => Ok((None, from)),
        Some(i) => Ok((Some(stow(ctx, &rest[..i])?), from + i)),
        None => Ok((Some(stow(ctx, rest)?), pat.len())),
    }
}

/// `${var:A%B=C%D}` applied to the words `v`.
fn subsub(ctx: &mut Ctx<'_>, v: &[String], pat: &str) -> Result<Vec<String>, ParseError> {
    let at = |i: usize| pat.as_bytes().get(i).copied();
    let (a, mut cp) = extractpat(ctx, pat, 0, "=%&")?;
    let (mut b, mut c, mut d) = (None, None, None);
    if is_percent(at(cp)) {
        let (w, p) = extractpat(ctx, pat, cp + 1, "=")?;
        b = w;
        cp = p;
    }
    if at(cp) == Some(b'=') {
        let (w, p) = extractpat(ctx, pat, cp + 1, "&%")?;
        c = w;
        cp = p;
    }
    let pct = is_percent(at(cp));
    if pct {
        d = Some(stow(ctx, &pat[cp + 1..])?);
    } else if cp < pat.len() {
        d = Some(stow(ctx, &pat[cp..])?);
    }
    let mut out = Vec::new();
    for s in v {
        let mut res: Option<Vec<String>> = None;
        if let Some((enda, nmid)) = submatch(s, a.as_deref(), b.as_deref()) {
            res = c.clone();
            if pct && nmid > 0 {
                let mid = &s[enda..enda + nmid as usize];
                match res.as_mut().and_then(|r| r.last_mut()) {
                    Some(last) => last.push_str(mid),
                    None => res = Some(vec![mid.to_string()]),
                }
            }
            if let Some(d) = d.as_ref().filter(|d| !d[0].is_empty()) {
                match res.as_mut() {
                    Some(r) if !r.is_empty() => {
                        let last = r.last_mut().expect("non-empty");
                        last.push_str(&d[0]);
                        r.extend(d[1..].iter().cloned());
                    }
                    _ => res = Some(d.clone()),
                }
            }
        }
        out.extend(res.unwrap_or_else(|| vec![s.clone()]));
    }
    Ok(out)
}

/// Whether `s` starts with one of `a` and ends with one of `b` (absent
/// lists match anything): the end of the `a` part and the length of
/// what lies between.
fn submatch(s: &str, a: Option<&[String]>, b: Option<&[String]>) -> Option<(usize, isize)> {
    let mut n = 0;
    if let Some(a) = a {
        let w = a.iter().find(|w| s.starts_with(w.as_str()))?;
        n = w.len();
    }
    let enda = n;
    let mut nmid = (s.len() - n) as isize;
    if let Some(b) = b {
        let w = b
            .iter()
            .find(|w| w.len() <= s.len() && s.ends_with(w.as_str()))?;
        nmid -= w.len() as isize;
    }
    Some((enda, nmid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(vars: &[(&str, &str)], s: &str) -> Vec<String> {
        let mut v = Vars::new();
        for (k, val) in vars {
            v.set(k, val.split(' ').map(String::from).collect());
        }
        let mut warnings = Vec::new();
        let mut ctx = Ctx {
            vars: &v,
            file: "t",
            line: 1,
            warnings: &mut warnings,
        };
        stow(&mut ctx, s).expect("expands")
    }

    #[test]
    fn stow_table() {
        let x = [("X", "foo.c bar.c"), ("E", ""), ("O", "a")];
        let cases: &[(&str, &[&str])] = &[
            ("a b  c", &["a", "b", "c"]),
            ("", &[""]),
            ("$X", &["foo.c", "bar.c"]),
            ("pre$X.post", &["prefoo.c", "bar.c.post"]),
            ("${X}y", &["foo.c", "bar.cy"]),
            ("${X:%.c=%.o}", &["foo.o", "bar.o"]),
            ("${X:.c=.o}", &["foo.c", "bar.c"]),
            ("${X:f%=g%}", &["goo.c", "bar.c"]),
            ("${X:%=%.x}", &["foo.c.x", "bar.c.x"]),
            ("${NOPE:a=b}", &["NOPE"]),
            ("$E x", &["x"]),
            ("a$E b", &["a", "b"]),
            ("'a b' c", &["a b", "c"]),
            ("\\$X", &["$X"]),
            ("a '' b", &["a"]),
            ("$O$O", &["aa"]),
            ("\"x:y\"", &["x:y"]),
        ];
        for (input, want) in cases {
            assert_eq!(expand(&x, input), *want, "input {input:?}");
        }
    }

    #[test]
    fn charin_table() {
        let cases: &[(&str, &str, Option<usize>)] = &[
            ("a:b", ":=", Some(1)),
            ("'a:b'=c", ":=", Some(5)),
            ("${X:a=b}: c", ":", Some(8)),
            ("a\\:b:", ":", Some(4)),
            ("abc", ":", None),
            ("'open", ":", None),
        ];
        for (s, pat, want) in cases {
            assert_eq!(charin(s, pat), *want, "{s:?}");
        }
    }

    #[test]
    fn missing_brace_is_an_error() {
        let v = Vars::new();
        let mut w = Vec::new();
        let mut ctx = Ctx {
            vars: &v,
            file: "t",
            line: 3,
            warnings: &mut w,
        };
        let e = stow(&mut ctx, "${X:a=b").expect_err("fails");
        assert_eq!(e.to_string(), "t:3: syntax error; missing '}': {X:a=b");
    }

    #[test]
    fn missing_variable_name_only_warns() {
        assert_eq!(expand(&[], "$(x)"), ["(x)"]);
    }
}
