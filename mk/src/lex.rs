//! Reading a mkfile into logical lines and recipe bodies: comments,
//! backslash-newline folding, quotes, and backquote substitution.

use crate::error::ParseError;

/// Runs a backquoted command and returns its output (one trailing
/// newline removed).
pub(crate) type Backquote<'a> = dyn FnMut(&str) -> Result<String, ParseError> + 'a;

/// A cursor over the characters of one mkfile.
#[derive(Debug)]
pub(crate) struct Lexer {
    chars: Vec<char>,
    pos: usize,
    /// The current line, counted as 9base counts it (1 + newlines read).
    pub line: usize,
    file: String,
}

impl Lexer {
    pub fn new(file: &str, text: &str) -> Self {
        Self {
            chars: text.chars().collect(),
            pos: 0,
            line: 1,
            file: file.to_string(),
        }
    }

    fn getc(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn syntax(&self, line: usize, msg: String) -> ParseError {
        ParseError::Syntax {
            file: self.file.clone(),
            line,
            msg,
        }
    }

    /// The next character with backslash-newline removed (`elide`) or
    /// turned into a blank.
    fn nextrune(&mut self, elide: bool) -> Option<char> {
        loop {
            let c = self.getc()?;
            if c == '\\' {
                let save = self.pos;
                let mut c2 = self.getc();
                if c2 == Some('\r') {
                    c2 = self.getc();
                }
                if c2 == Some('\n') {
                    self.line += 1;
                    if elide {
                        continue;
                    }
                    return Some(' ');
                }
                self.pos = save;
            }
            if c == '\n' {
                self.line += 1;
            }
            return Some(c);
        }
    }

    /// Copies a quoted or escaped token (the opening character is already
    /// in `buf`).
    fn escapetoken(&mut self, buf: &mut String, esc: char) -> Result<(), ParseError> {
        if esc == '\\' {
            let mut c = self.getc();
            if c == Some('\r') {
                c = self.getc();
            }
            if let Some(c) = c {
                if c == '\n' {
                    self.line += 1;
                }
                buf.push(c);
            }
            return Ok(());
        }
        let line = self.line;
        while let Some(c) = self.nextrune(false) {
            if c == esc {
                buf.push(c);
                return Ok(());
            }
            if c == '\\' {
                buf.push(c);
                let mut d = self.getc();
                if d == Some('\r') {
                    d = self.getc();
                }
                let Some(d) = d else { break };
                if d == '\n' {
                    self.line += 1;
                }
                buf.push(d);
                continue;
            }
            buf.push(c);
        }
        Err(self.syntax(line, format!("missing closing {esc}")))
    }

    fn bquote(&mut self, buf: &mut String, run: &mut Backquote<'_>) -> Result<(), ParseError> {
        let line = self.line;
        let mut c = self.getc();
        while matches!(c, Some(' ' | '\t')) {
            c = self.getc();
        }
        let term = if c == Some('{') {
            c = self.getc();
            while matches!(c, Some(' ' | '\t')) {
                c = self.getc();
            }
            '}'
        } else {
            '`'
        };
        let start = buf.len();
        while let Some(ch) = c {
            if ch == term {
                let mut cmd = buf.split_off(start);
                cmd.push('\n');
                buf.push_str(&run(&cmd)?);
                return Ok(());
            }
            if ch == '\n' {
                break;
            }
            if matches!(ch, '\'' | '"' | '\\') {
                buf.push(ch);
                self.escapetoken(buf, ch)?;
            } else {
                buf.push(ch);
            }
            c = self.nextrune(false);
        }
        Err(self.syntax(line, format!("missing closing {term} after `")))
    }

    /// The next logical line, or `None` at the end of the input.
    pub fn assline(&mut self, run: &mut Backquote<'_>) -> Result<Option<String>, ParseError> {
        let mut buf = String::new();
        while let Some(c) = self.nextrune(true) {
            match c {
                '\r' => {}
                '\n' => {
                    if !buf.is_empty() {
                        return Ok(Some(buf));
                    }
                }
                '\\' | '\'' | '"' => {
                    buf.push(c);
                    self.escapetoken(&mut buf, c)?;
                }
                '`' => self.bquote(&mut buf, run)?,
                '#' => {
                    let mut lastc = '#';
                    loop {
                        match self.getc() {
                            None => return Ok((!buf.is_empty()).then_some(buf)),
                            Some('\n') => break,
                            Some('\r') => {}
                            Some(d) => lastc = d,
                        }
                    }
                    self.line += 1;
                    if lastc == '\\' {
                        continue;
                    }
                    if !buf.is_empty() {
                        return Ok(Some(buf));
                    }
                }
                _ => buf.push(c),
            }
        }
        Ok((!buf.is_empty()).then_some(buf))
    }

    /// The recipe after a rule line: following lines that start with a
    /// blank (which is removed) or `#`.
    pub fn rbody(&mut self) -> String {
        let mut buf = String::new();
        let mut lastr = '\n';
        while let Some(r) = self.peek() {
            if lastr == '\n' {
                if r == '#' {
                    buf.push(r);
                } else if r != ' ' && r != '\t' {
                    break;
                }
            } else {
                buf.push(r);
            }
            self.pos += 1;
            lastr = r;
            if r == '\n' {
                self.line += 1;
            }
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        let mut lx = Lexer::new("t", text);
        let mut run = |cmd: &str| Ok(format!("<{}>", cmd.trim_end()));
        let mut out = Vec::new();
        while let Some(l) = lx.assline(&mut run).expect("lexes") {
            out.push(l);
        }
        out
    }

    #[test]
    fn assline_table() {
        let cases: &[(&str, &[&str])] = &[
            ("a: b\n", &["a: b"]),
            ("\n\na=1\n\nb=2", &["a=1", "b=2"]),
            ("a=1 # comment\nb=2\n", &["a=1 ", "b=2"]),
            ("# only\n", &[]),
            ("a=1 \\\n 2\n", &["a=1  2"]),
            ("a='x\\\ny'\n", &["a='x y'"]),
            ("a=`echo hi`\n", &["a=<echo hi>"]),
            ("a=`{echo hi}\n", &["a=<echo hi>"]),
            ("a=x\\#y\n", &["a=x\\#y"]),
            ("a=1\r\n", &["a=1"]),
        ];
        for (text, want) in cases {
            assert_eq!(lines(text), *want, "input {text:?}");
        }
    }

    #[test]
    fn unterminated_quote_reports_its_line() {
        let mut lx = Lexer::new("f", "\na='x\n");
        let mut run = |_: &str| Ok(String::new());
        let e = lx.assline(&mut run).expect_err("fails");
        assert_eq!(e.to_string(), "f:2: syntax error; missing closing '");
    }

    #[test]
    fn rbody_takes_indented_and_hash_lines() {
        let mut lx = Lexer::new("t", "x:\n\techo 1\n# c\n  echo 2\n\ny=1\n");
        let mut run = |_: &str| Ok(String::new());
        assert_eq!(lx.assline(&mut run).expect("line").as_deref(), Some("x:"));
        assert_eq!(lx.rbody(), "echo 1\n# c\n echo 2\n");
        assert_eq!(lx.assline(&mut run).expect("line").as_deref(), Some("y=1"));
    }
}
