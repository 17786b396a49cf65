//! Tokens of the selector language, each with the byte offset where it starts. Keywords after a
//! label (`in`, `not in`, `contains`, `starts with`, `ends with`) are recognised only there, as
//! upstream's tokenizer does, so labels may be named `in` or `contains`.

use crate::parser::SelectorError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    Eq,
    Ne,
    Not,
    And,
    Or,
    In,
    NotIn,
    Contains,
    StartsWith,
    EndsWith,
    All,
    Global,
    Has(String),
    Label(String),
    Str(String),
    Eof,
}

impl Tok {
    /// How the token reads in an error message.
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::LBrace => "'{'".into(),
            Tok::RBrace => "'}'".into(),
            Tok::Comma => "','".into(),
            Tok::Eq => "'=='".into(),
            Tok::Ne => "'!='".into(),
            Tok::Not => "'!'".into(),
            Tok::And => "'&&'".into(),
            Tok::Or => "'||'".into(),
            Tok::In => "'in'".into(),
            Tok::NotIn => "'not in'".into(),
            Tok::Contains => "'contains'".into(),
            Tok::StartsWith => "'starts with'".into(),
            Tok::EndsWith => "'ends with'".into(),
            Tok::All => "'all()'".into(),
            Tok::Global => "'global()'".into(),
            Tok::Has(k) => format!("'has({k})'"),
            Tok::Label(k) => format!("label '{k}'"),
            Tok::Str(s) => format!("string \"{s}\""),
            Tok::Eof => "end of selector".into(),
        }
    }
}

/// The longest label name upstream's tokenizer reads (`[a-zA-Z0-9_./-]{1,512}`).
pub const MAX_LABEL: usize = 512;

pub(crate) fn is_label_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'/' | b'-')
}

fn is_space(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

struct Lexer<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn skip_space(&mut self) {
        while self.rest().as_bytes().first().is_some_and(|&c| is_space(c)) {
            self.pos += 1;
        }
    }

    fn err(&self, offset: usize, message: impl Into<String>) -> SelectorError {
        SelectorError::new(offset, message)
    }

    /// Consumes `word` if the input continues with it as a whole word.
    fn eat_word(&mut self, word: &str) -> bool {
        let rest = self.rest();
        if rest.starts_with(word)
            && !rest
                .as_bytes()
                .get(word.len())
                .is_some_and(|&c| is_label_char(c))
        {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    /// A label name (1 to [`MAX_LABEL`] label characters), `None` when there is none here.
    fn label(&mut self) -> Result<Option<String>, SelectorError> {
        let len = self
            .rest()
            .bytes()
            .take_while(|&c| is_label_char(c))
            .count();
        if len > MAX_LABEL {
            return Err(self.err(
                self.pos,
                format!("label name longer than {MAX_LABEL} characters ({len})"),
            ));
        }
        Ok((len > 0).then(|| {
            let label = self.rest()[..len].to_owned();
            self.pos += len;
            label
        }))
    }

    /// After `name(`, optional spaces then `)`.
    fn close_paren(&mut self, name: &str, start: usize) -> Result<(), SelectorError> {
        self.skip_space();
        if self.rest().starts_with(')') {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(
                self.pos,
                format!("expected ')' to close '{name}(' opened at offset {start}"),
            ))
        }
    }

    /// The operator after a label.
    fn operator(&mut self, label: &str) -> Result<Tok, SelectorError> {
        let start = self.pos;
        // As upstream's tokenizer: the words may be written together (`startswith`,
        // `endswith`, `notin`) or apart.
        let two_words = |lexer: &mut Self, first: &str, second: &str, tok: Tok| {
            if lexer.rest().starts_with(first) {
                lexer.pos += first.len();
                lexer.skip_space();
                if lexer.eat_word(second) {
                    return Some(Ok(tok));
                }
                return Some(Err(lexer.err(
                    lexer.pos,
                    format!("expected '{second}' after '{first}' (after label '{label}')"),
                )));
            }
            None
        };
        if self.eat_word("contains") {
            return Ok(Tok::Contains);
        }
        if let Some(tok) = two_words(self, "starts", "with", Tok::StartsWith) {
            return tok;
        }
        if let Some(tok) = two_words(self, "ends", "with", Tok::EndsWith) {
            return tok;
        }
        if let Some(tok) = two_words(self, "not", "in", Tok::NotIn) {
            return tok;
        }
        if self.eat_word("in") {
            return Ok(Tok::In);
        }
        Err(self.err(
            start,
            format!(
                "expected an operator (==, !=, in, not in, contains, starts with, ends with) \
                 after label '{label}'"
            ),
        ))
    }
}

/// Splits `input` into tokens with their offsets; the last token is always `Eof`.
pub(crate) fn lex(input: &str) -> Result<Vec<(usize, Tok)>, SelectorError> {
    let mut lx = Lexer { input, pos: 0 };
    let mut tokens: Vec<(usize, Tok)> = Vec::new();
    loop {
        lx.skip_space();
        let start = lx.pos;
        let Some(&c) = lx.rest().as_bytes().first() else {
            tokens.push((start, Tok::Eof));
            return Ok(tokens);
        };
        let after_label = matches!(tokens.last(), Some((_, Tok::Label(_))));
        let tok = match c {
            b'(' => {
                lx.pos += 1;
                Tok::LParen
            }
            b')' => {
                lx.pos += 1;
                Tok::RParen
            }
            b'{' => {
                lx.pos += 1;
                Tok::LBrace
            }
            b'}' => {
                lx.pos += 1;
                Tok::RBrace
            }
            b',' => {
                lx.pos += 1;
                Tok::Comma
            }
            b'"' | b'\'' => {
                let quote = c as char;
                let body = &lx.rest()[1..];
                let Some(end) = body.find(quote) else {
                    return Err(lx.err(start, format!("unterminated string (no closing {quote})")));
                };
                let value = body[..end].to_owned();
                lx.pos += end + 2;
                Tok::Str(value)
            }
            b'=' => {
                if lx.rest().starts_with("==") {
                    lx.pos += 2;
                    Tok::Eq
                } else {
                    return Err(lx.err(start, "expected '==' ('=' alone is not an operator)"));
                }
            }
            b'!' => {
                if lx.rest().starts_with("!=") {
                    lx.pos += 2;
                    Tok::Ne
                } else {
                    lx.pos += 1;
                    Tok::Not
                }
            }
            b'&' => {
                if lx.rest().starts_with("&&") {
                    lx.pos += 2;
                    Tok::And
                } else {
                    return Err(lx.err(start, "expected '&&'"));
                }
            }
            b'|' => {
                if lx.rest().starts_with("||") {
                    lx.pos += 2;
                    Tok::Or
                } else {
                    return Err(lx.err(start, "expected '||'"));
                }
            }
            _ if after_label => {
                let Some((_, Tok::Label(label))) = tokens.last() else {
                    unreachable!("after_label checked the last token")
                };
                let label = label.clone();
                lx.operator(&label)?
            }
            _ if lx.rest().starts_with("has(") => {
                lx.pos += "has(".len();
                lx.skip_space();
                let Some(label) = lx.label()? else {
                    return Err(lx.err(lx.pos, "expected a label name in 'has(…)'"));
                };
                lx.close_paren("has", start)?;
                Tok::Has(label)
            }
            _ if lx.rest().starts_with("all(") => {
                lx.pos += "all(".len();
                lx.close_paren("all", start)?;
                Tok::All
            }
            _ if lx.rest().starts_with("global(") => {
                lx.pos += "global(".len();
                lx.close_paren("global", start)?;
                Tok::Global
            }
            _ => match lx.label()? {
                Some(label) => Tok::Label(label),
                None => {
                    let ch = lx.rest().chars().next().unwrap_or('?');
                    return Err(lx.err(start, format!("unexpected character '{ch}'")));
                }
            },
        };
        tokens.push((start, tok));
    }
}
