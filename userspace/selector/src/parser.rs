//! Recursive-descent parser: `||` binds loosest, then `&&`, then `!`.

use std::collections::BTreeSet;

use crate::{
    lexer::{lex, Tok},
    Expr, Selector,
};

/// Deepest nesting of parentheses and `!` accepted; deeper input is refused rather than risking
/// the stack on hostile input.
const MAX_DEPTH: usize = 128;

/// A selector that does not parse: what is wrong and the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at offset {offset}")]
pub struct SelectorError {
    /// Byte offset into the selector text.
    pub offset: usize,
    /// What is wrong there.
    pub message: String,
}

impl SelectorError {
    pub(crate) fn new(offset: usize, message: impl Into<String>) -> Self {
        Self {
            offset,
            message: message.into(),
        }
    }

    /// The selector text with a caret under the offending position, for terminals.
    pub fn caret(&self, input: &str) -> String {
        let column = input
            .get(..self.offset.min(input.len()))
            .map_or(self.offset, |s| s.chars().count());
        format!("{input}\n{}^", " ".repeat(column))
    }
}

impl Selector {
    /// Parses selector text. The empty (or all-blank) selector is `all()`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let tokens = lex(input)?;
        let mut parser = Parser { tokens, next: 0 };
        if parser.peek() == &Tok::Eof {
            return Ok(Selector::all());
        }
        let expr = parser.or_expr(0)?;
        match parser.peek() {
            Tok::Eof => Ok(Selector { expr }),
            tok => Err(parser.error_here(format!(
                "unexpected {} (expected '&&', '||' or the end)",
                tok.describe()
            ))),
        }
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

struct Parser {
    tokens: Vec<(usize, Tok)>,
    next: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.tokens[self.next].1
    }

    fn offset(&self) -> usize {
        self.tokens[self.next].0
    }

    fn bump(&mut self) -> Tok {
        let tok = self.tokens[self.next].1.clone();
        if tok != Tok::Eof {
            self.next += 1;
        }
        tok
    }

    fn error_here(&self, message: impl Into<String>) -> SelectorError {
        SelectorError::new(self.offset(), message)
    }

    fn or_expr(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        let mut ops = vec![self.and_expr(depth)?];
        while self.peek() == &Tok::Or {
            self.bump();
            ops.push(self.and_expr(depth)?);
        }
        Ok(if ops.len() == 1 {
            ops.pop().expect("one operand")
        } else {
            Expr::Or(ops)
        })
    }

    fn and_expr(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        let mut ops = vec![self.unary(depth)?];
        while self.peek() == &Tok::And {
            self.bump();
            ops.push(self.unary(depth)?);
        }
        Ok(if ops.len() == 1 {
            ops.pop().expect("one operand")
        } else {
            Expr::And(ops)
        })
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        if depth > MAX_DEPTH {
            return Err(self.error_here(format!("selector nested deeper than {MAX_DEPTH} levels")));
        }
        let start = self.offset();
        match self.bump() {
            Tok::Not => Ok(self.unary(depth + 1)?.negate()),
            Tok::LParen => {
                let inner = self.or_expr(depth + 1)?;
                let close_offset = self.offset();
                match self.bump() {
                    Tok::RParen => Ok(inner),
                    tok => Err(SelectorError::new(
                        close_offset,
                        format!(
                            "expected ')' to close '(' at offset {start}, found {}",
                            tok.describe()
                        ),
                    )),
                }
            }
            Tok::All => Ok(Expr::All),
            Tok::Global => Ok(Expr::Global),
            Tok::Has(label) => Ok(Expr::Has(label)),
            Tok::Label(label) => self.comparison(label),
            tok => Err(SelectorError::new(
                start,
                format!(
                    "expected a label, 'has(…)', 'all()', 'global()', '!' or '(', found {}",
                    tok.describe()
                ),
            )),
        }
    }

    fn comparison(&mut self, label: String) -> Result<Expr, SelectorError> {
        let op_offset = self.offset();
        let op = self.bump();
        let expr = match op {
            Tok::Eq => Expr::Eq(label, self.string(&op)?),
            Tok::Ne => Expr::Ne(label, self.string(&op)?),
            Tok::Contains => Expr::Contains(label, self.string(&op)?),
            Tok::StartsWith => Expr::StartsWith(label, self.string(&op)?),
            Tok::EndsWith => Expr::EndsWith(label, self.string(&op)?),
            Tok::In => Expr::In(label, self.set()?),
            Tok::NotIn => Expr::NotIn(label, self.set()?),
            tok => {
                return Err(SelectorError::new(
                    op_offset,
                    format!(
                        "expected an operator after label '{label}', found {}",
                        tok.describe()
                    ),
                ))
            }
        };
        Ok(expr)
    }

    fn string(&mut self, after: &Tok) -> Result<String, SelectorError> {
        let offset = self.offset();
        match self.bump() {
            Tok::Str(s) => Ok(s),
            tok => Err(SelectorError::new(
                offset,
                format!(
                    "expected a quoted string after {}, found {}",
                    after.describe(),
                    tok.describe()
                ),
            )),
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        let offset = self.offset();
        match self.bump() {
            Tok::LBrace => {}
            tok => {
                return Err(SelectorError::new(
                    offset,
                    format!("expected '{{' to open a set, found {}", tok.describe()),
                ))
            }
        }
        let mut values = BTreeSet::new();
        if self.peek() == &Tok::RBrace {
            self.bump();
            return Ok(values);
        }
        loop {
            let offset = self.offset();
            match self.bump() {
                Tok::Str(s) => {
                    values.insert(s);
                }
                tok => {
                    return Err(SelectorError::new(
                        offset,
                        format!(
                            "expected a quoted string in the set, found {}",
                            tok.describe()
                        ),
                    ))
                }
            }
            let offset = self.offset();
            match self.bump() {
                // A trailing comma before `}` is allowed, as upstream allows it.
                Tok::Comma if self.peek() == &Tok::RBrace => {
                    self.bump();
                    return Ok(values);
                }
                Tok::Comma => {}
                Tok::RBrace => return Ok(values),
                tok => {
                    return Err(SelectorError::new(
                        offset,
                        format!("expected ',' or '}}' in the set, found {}", tok.describe()),
                    ))
                }
            }
        }
    }
}
