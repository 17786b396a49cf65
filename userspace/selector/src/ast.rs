use std::{collections::BTreeSet, fmt};

/// A parsed selector expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `all()`: matches everything.
    All,
    /// `global()`: in a namespace selector, "non-namespaced resources"; as a label match it
    /// matches everything (the caller gives it its meaning, as upstream does).
    Global,
    /// `has(k)`
    Has(String),
    /// `k == "v"`
    Eq(String, String),
    /// `k != "v"` (also matches when `k` is absent)
    Ne(String, String),
    /// `k in {"a", "b"}`
    In(String, BTreeSet<String>),
    /// `k not in {"a", "b"}` (also matches when `k` is absent)
    NotIn(String, BTreeSet<String>),
    /// `k contains "s"`
    Contains(String, String),
    /// `k starts with "s"`
    StartsWith(String, String),
    /// `k ends with "s"`
    EndsWith(String, String),
    /// `!e`
    Not(Box<Expr>),
    /// `a && b && …` (two or more operands)
    And(Vec<Expr>),
    /// `a || b || …` (two or more operands)
    Or(Vec<Expr>),
}

impl Expr {
    /// `!self`, with a double negation taken away (`!!e` is `e`, as upstream prints it).
    pub fn negate(self) -> Expr {
        match self {
            Expr::Not(inner) => *inner,
            other => Expr::Not(Box::new(other)),
        }
    }

    /// The expression with `prefix` before every label name (`pcsa.` turns a service-account
    /// selector into one over the labels endpoints inherit from their `ksa.*` profile).
    pub fn with_prefix(self, prefix: &str) -> Expr {
        let p = |k: String| format!("{prefix}{k}");
        match self {
            Expr::All => Expr::All,
            Expr::Global => Expr::Global,
            Expr::Has(k) => Expr::Has(p(k)),
            Expr::Eq(k, v) => Expr::Eq(p(k), v),
            Expr::Ne(k, v) => Expr::Ne(p(k), v),
            Expr::In(k, s) => Expr::In(p(k), s),
            Expr::NotIn(k, s) => Expr::NotIn(p(k), s),
            Expr::Contains(k, v) => Expr::Contains(p(k), v),
            Expr::StartsWith(k, v) => Expr::StartsWith(p(k), v),
            Expr::EndsWith(k, v) => Expr::EndsWith(p(k), v),
            Expr::Not(e) => Expr::Not(Box::new(e.with_prefix(prefix))),
            Expr::And(ops) => Expr::And(ops.into_iter().map(|e| e.with_prefix(prefix)).collect()),
            Expr::Or(ops) => Expr::Or(ops.into_iter().map(|e| e.with_prefix(prefix)).collect()),
        }
    }

    /// `a && b`, flattened, with `all()` dropped from it.
    pub fn and(self, other: Expr) -> Expr {
        let mut ops = Vec::new();
        for e in [self, other] {
            match e {
                Expr::All => {}
                Expr::And(inner) => ops.extend(inner),
                e => ops.push(e),
            }
        }
        match ops.len() {
            0 => Expr::All,
            1 => ops.pop().expect("one operand"),
            _ => Expr::And(ops),
        }
    }

    /// The expression with every double negation taken away.
    fn canonical(self) -> Expr {
        match self {
            Expr::Not(inner) => inner.canonical().negate(),
            Expr::And(ops) => Expr::And(ops.into_iter().map(Expr::canonical).collect()),
            Expr::Or(ops) => Expr::Or(ops.into_iter().map(Expr::canonical).collect()),
            leaf => leaf,
        }
    }
}

/// A selector: its expression and its canonical text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    pub(crate) expr: Expr,
}

impl Selector {
    /// The selector that matches everything (`all()`); also what an empty selector means.
    pub fn all() -> Self {
        Self { expr: Expr::All }
    }

    /// Wraps an expression (for building selectors in code), in the form parsing gives it:
    /// `!!e` is `e`.
    pub fn from_expr(expr: Expr) -> Self {
        Self {
            expr: expr.canonical(),
        }
    }

    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// `true` for `all()` (and the empty selector).
    pub fn is_all(&self) -> bool {
        self.expr == Expr::All
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.expr.fmt(f)
    }
}

/// Upstream's canonical form: single spaces around operators, `&&`/`||` groups always in
/// parentheses, double quotes unless the value holds one, sets sorted without duplicates.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::All => f.write_str("all()"),
            Expr::Global => f.write_str("global()"),
            Expr::Has(k) => write!(f, "has({k})"),
            Expr::Eq(k, v) => write!(f, "{k} == {}", Quoted(v)),
            Expr::Ne(k, v) => write!(f, "{k} != {}", Quoted(v)),
            Expr::Contains(k, v) => write!(f, "{k} contains {}", Quoted(v)),
            Expr::StartsWith(k, v) => write!(f, "{k} starts with {}", Quoted(v)),
            Expr::EndsWith(k, v) => write!(f, "{k} ends with {}", Quoted(v)),
            Expr::In(k, set) => write!(f, "{k} in {}", QuotedSet(set)),
            Expr::NotIn(k, set) => write!(f, "{k} not in {}", QuotedSet(set)),
            Expr::Not(e) => write!(f, "!{e}"),
            Expr::And(ops) => write_group(f, ops, " && "),
            Expr::Or(ops) => write_group(f, ops, " || "),
        }
    }
}

fn write_group(f: &mut fmt::Formatter<'_>, ops: &[Expr], sep: &str) -> fmt::Result {
    f.write_str("(")?;
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        write!(f, "{op}")?;
    }
    f.write_str(")")
}

struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quote = if self.0.contains('"') { '\'' } else { '"' };
        write!(f, "{quote}{}{quote}", self.0)
    }
}

struct QuotedSet<'a>(&'a BTreeSet<String>);

impl fmt::Display for QuotedSet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", Quoted(v))?;
        }
        f.write_str("}")
    }
}
