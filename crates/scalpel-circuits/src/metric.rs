//! What a patching, ablation or steering experiment measures: a number per prompt computed from
//! the logits at its last position.
//!
//! Built in: the logit difference between the right and the wrong answer (`logit_diff`), the
//! probability of the answer (`prob`) and its log-probability (`logprob`). Anything else is an
//! expression over the logits, e.g. `logprob(answer) - logprob(wrong)` or
//! `logit(" Paris") - 0.5 * (logit(" London") + logit(" Rome"))`: numbers, `+ - * /`,
//! parentheses, and `logit(t)`, `prob(t)`, `logprob(t)` where `t` is `answer`, `wrong`, a quoted
//! single-token string, or `#id` for a token id.
//!
//! Metrics are evaluated on tensors so that the same definition serves exact patching (values)
//! and attribution patching (gradients).

use candle_core::{DType, Tensor, D};
use scalpel_models::tokenizer::Tokenizer;

use crate::{CircuitError, Result};

/// A token named in a metric.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenRef {
    /// The pair's right answer.
    Answer,
    /// The pair's wrong answer.
    Wrong,
    /// A fixed token id.
    Id(u32),
}

/// What is read from the logits of one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Logit,
    Prob,
    LogProb,
}

/// A parsed metric expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(f64),
    Token(Read, TokenRef),
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
}

/// A metric over the last position's logits of each prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// The text it was parsed from (shown in reports).
    pub name: String,
    expr: Expr,
}

impl Metric {
    /// `logit(answer) - logit(wrong)`.
    pub fn logit_diff() -> Metric {
        Metric {
            name: "logit_diff".into(),
            expr: Expr::Sub(
                Box::new(Expr::Token(Read::Logit, TokenRef::Answer)),
                Box::new(Expr::Token(Read::Logit, TokenRef::Wrong)),
            ),
        }
    }

    /// `prob(answer)`.
    pub fn prob() -> Metric {
        Metric {
            name: "prob".into(),
            expr: Expr::Token(Read::Prob, TokenRef::Answer),
        }
    }

    /// Parses `logit_diff`, `prob`, `logprob` or an expression (see the module docs). Quoted
    /// token strings need `tok`, and must be a single token.
    pub fn parse(text: &str, tok: Option<&Tokenizer>) -> Result<Metric> {
        let name = text.trim().to_string();
        let expr = match name.as_str() {
            "logit_diff" => return Ok(Metric::logit_diff()),
            "prob" => return Ok(Metric::prob()),
            "logprob" => Expr::Token(Read::LogProb, TokenRef::Answer),
            _ => {
                let mut p = Parser {
                    src: &name,
                    pos: 0,
                    tok,
                };
                let e = p.expr()?;
                p.skip_ws();
                if p.pos < p.src.len() {
                    return Err(p.error("unexpected text"));
                }
                e
            }
        };
        Ok(Metric { name, expr })
    }

    /// The parsed expression.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// True when the metric needs the whole vocabulary (a softmax); otherwise only the logits
    /// of the tokens it names are read.
    pub fn needs_softmax(&self) -> bool {
        fn walk(e: &Expr) -> bool {
            match e {
                Expr::Num(_) => false,
                Expr::Token(r, _) => *r != Read::Logit,
                Expr::Neg(a) => walk(a),
                Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
                    walk(a) || walk(b)
                }
            }
        }
        walk(&self.expr)
    }

    /// True when the metric is a linear function of the logits (no softmax, no products of
    /// logits, no division by logits).
    pub fn is_linear(&self) -> bool {
        fn constant(e: &Expr) -> bool {
            match e {
                Expr::Num(_) => true,
                Expr::Token(..) => false,
                Expr::Neg(a) => constant(a),
                Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
                    constant(a) && constant(b)
                }
            }
        }
        fn walk(e: &Expr) -> bool {
            match e {
                Expr::Num(_) => true,
                Expr::Token(r, _) => *r == Read::Logit,
                Expr::Neg(a) => walk(a),
                Expr::Add(a, b) | Expr::Sub(a, b) => walk(a) && walk(b),
                Expr::Mul(a, b) => (constant(a) && walk(b)) || (walk(a) && constant(b)),
                Expr::Div(a, b) => walk(a) && constant(b),
            }
        }
        walk(&self.expr)
    }

    /// The metric of each prompt from its last-position logits `[n, d_vocab]`, with the pairs'
    /// answers and wrong answers (`n` each): a `[n]` f32 tensor, differentiable.
    pub fn eval(&self, logits: &Tensor, answer: &[u32], wrong: &[u32]) -> Result<Tensor> {
        let (n, v) = logits.dims2()?;
        if answer.len() != n || wrong.len() != n {
            return Err(CircuitError::Input(format!(
                "{n} rows of logits but {} answers and {} wrong answers",
                answer.len(),
                wrong.len()
            )));
        }
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let log_probs = if self.needs_softmax() {
            Some(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
        } else {
            None
        };
        let ev = Eval {
            logits: &logits,
            log_probs: log_probs.as_ref(),
            answer,
            wrong,
            vocab: v,
            dev: logits.device(),
        };
        ev.eval(&self.expr)
    }

    /// [`Metric::eval`] averaged over the prompts, as a number.
    pub fn mean(&self, logits: &Tensor, answer: &[u32], wrong: &[u32]) -> Result<f64> {
        Ok(self
            .eval(logits, answer, wrong)?
            .mean_all()?
            .to_scalar::<f32>()? as f64)
    }

    /// The same metric over a reduced vocabulary: every fixed token id `t` becomes `index[t]`
    /// (ids missing from `index` are kept).
    pub fn remapped(&self, index: &std::collections::HashMap<u32, u32>) -> Metric {
        fn walk(e: &Expr, index: &std::collections::HashMap<u32, u32>) -> Expr {
            let b = |a: &Expr| Box::new(walk(a, index));
            match e {
                Expr::Token(r, TokenRef::Id(id)) => {
                    Expr::Token(*r, TokenRef::Id(*index.get(id).unwrap_or(id)))
                }
                Expr::Num(_) | Expr::Token(..) => e.clone(),
                Expr::Neg(a) => Expr::Neg(b(a)),
                Expr::Add(x, y) => Expr::Add(b(x), b(y)),
                Expr::Sub(x, y) => Expr::Sub(b(x), b(y)),
                Expr::Mul(x, y) => Expr::Mul(b(x), b(y)),
                Expr::Div(x, y) => Expr::Div(b(x), b(y)),
            }
        }
        Metric {
            name: self.name.clone(),
            expr: walk(&self.expr, index),
        }
    }

    /// Token ids the metric reads besides the answers (for checking them against a vocabulary).
    pub fn fixed_tokens(&self) -> Vec<u32> {
        fn walk(e: &Expr, out: &mut Vec<u32>) {
            match e {
                Expr::Token(_, TokenRef::Id(id)) => out.push(*id),
                Expr::Num(_) | Expr::Token(..) => {}
                Expr::Neg(a) => walk(a, out),
                Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
                    walk(a, out);
                    walk(b, out)
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.expr, &mut out);
        out
    }
}

struct Eval<'a> {
    logits: &'a Tensor,
    log_probs: Option<&'a Tensor>,
    answer: &'a [u32],
    wrong: &'a [u32],
    vocab: usize,
    dev: &'a candle_core::Device,
}

impl Eval<'_> {
    fn eval(&self, e: &Expr) -> Result<Tensor> {
        let n = self.answer.len();
        Ok(match e {
            Expr::Num(x) => Tensor::full(*x as f32, n, self.dev)?,
            Expr::Token(read, t) => {
                let ids: Vec<u32> = match t {
                    TokenRef::Answer => self.answer.to_vec(),
                    TokenRef::Wrong => self.wrong.to_vec(),
                    TokenRef::Id(id) => vec![*id; n],
                };
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab) {
                    return Err(CircuitError::Input(format!(
                        "the metric reads token id {bad}, outside the vocabulary of {}",
                        self.vocab
                    )));
                }
                let idx = Tensor::from_vec(ids, (n, 1), self.dev)?;
                let src = match read {
                    Read::Logit => self.logits,
                    Read::Prob | Read::LogProb => self
                        .log_probs
                        .expect("log-probabilities are computed for softmax metrics"),
                };
                let x = src.gather(&idx, 1)?.squeeze(1)?;
                match read {
                    Read::Prob => x.exp()?,
                    Read::Logit | Read::LogProb => x,
                }
            }
            Expr::Neg(a) => self.eval(a)?.neg()?,
            Expr::Add(a, b) => (self.eval(a)? + self.eval(b)?)?,
            Expr::Sub(a, b) => (self.eval(a)? - self.eval(b)?)?,
            Expr::Mul(a, b) => (self.eval(a)? * self.eval(b)?)?,
            Expr::Div(a, b) => (self.eval(a)? / self.eval(b)?)?,
        })
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    tok: Option<&'a Tokenizer>,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> CircuitError {
        CircuitError::Input(format!(
            "metric {:?}: {what} at character {} (expected e.g. `logit_diff`, `prob`, \
             `logprob(answer) - logprob(wrong)` or `logit(\" Paris\") - logit(#42)`)",
            self.src,
            self.pos + 1
        ))
    }

    fn skip_ws(&mut self) {
        while self.src[self.pos..].starts_with(char::is_whitespace) {
            self.pos += self.src[self.pos..]
                .chars()
                .next()
                .map_or(1, char::len_utf8);
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.src[self.pos..].chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Expr> {
        let mut e = self.term()?;
        loop {
            if self.eat('+') {
                e = Expr::Add(Box::new(e), Box::new(self.term()?));
            } else if self.eat('-') {
                e = Expr::Sub(Box::new(e), Box::new(self.term()?));
            } else {
                return Ok(e);
            }
        }
    }

    fn term(&mut self) -> Result<Expr> {
        let mut e = self.factor()?;
        loop {
            if self.eat('*') {
                e = Expr::Mul(Box::new(e), Box::new(self.factor()?));
            } else if self.eat('/') {
                e = Expr::Div(Box::new(e), Box::new(self.factor()?));
            } else {
                return Ok(e);
            }
        }
    }

    fn factor(&mut self) -> Result<Expr> {
        match self.peek() {
            None => Err(self.error("the expression ends early")),
            Some('-') => {
                self.pos += 1;
                Ok(Expr::Neg(Box::new(self.factor()?)))
            }
            Some('(') => {
                self.pos += 1;
                let e = self.expr()?;
                if !self.eat(')') {
                    return Err(self.error("missing `)`"));
                }
                Ok(e)
            }
            Some(c) if c.is_ascii_digit() || c == '.' => {
                let start = self.pos;
                while self.src[self.pos..]
                    .starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == 'e')
                {
                    self.pos += 1;
                }
                let s = &self.src[start..self.pos];
                let x: f64 = s.parse().map_err(|_| {
                    self.pos = start;
                    self.error(&format!("{s:?} is not a number"))
                })?;
                if !x.is_finite() {
                    return Err(self.error("numbers must be finite"));
                }
                Ok(Expr::Num(x))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.pos;
                while self.src[self.pos..]
                    .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                {
                    self.pos += 1;
                }
                let word = &self.src[start..self.pos];
                let read = match word {
                    "logit" => Read::Logit,
                    "prob" => Read::Prob,
                    "logprob" => Read::LogProb,
                    _ => {
                        self.pos = start;
                        return Err(self.error(&format!(
                            "unknown name `{word}` (functions: logit, prob, logprob)"
                        )));
                    }
                };
                if !self.eat('(') {
                    return Err(self.error(&format!("`{word}` needs a token in parentheses")));
                }
                let t = self.token()?;
                if !self.eat(')') {
                    return Err(self.error("missing `)`"));
                }
                Ok(Expr::Token(read, t))
            }
            Some(_) => Err(self.error("unexpected character")),
        }
    }

    fn token(&mut self) -> Result<TokenRef> {
        match self.peek() {
            Some('"') => {
                self.pos += 1;
                let rest = &self.src[self.pos..];
                let Some(end) = rest.find('"') else {
                    return Err(self.error("unterminated string"));
                };
                let text = rest[..end].to_string();
                self.pos += end + 1;
                let Some(tok) = self.tok else {
                    return Err(self.error("a quoted token needs the model's tokenizer"));
                };
                let ids = tok.encode(&text, false)?;
                match ids.as_slice() {
                    [id] => Ok(TokenRef::Id(*id)),
                    _ => Err(CircuitError::Input(format!(
                        "metric {:?}: {text:?} is {} tokens ({:?}); each token in a metric must \
                         be exactly one (a leading space often matters)",
                        self.src,
                        ids.len(),
                        tok.token_strings(&ids)
                    ))),
                }
            }
            Some('#') => {
                self.pos += 1;
                let start = self.pos;
                while self.src[self.pos..].starts_with(|c: char| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                self.src[start..self.pos]
                    .parse()
                    .map(TokenRef::Id)
                    .map_err(|_| self.error("`#` must be followed by a token id"))
            }
            _ => {
                let start = self.pos;
                while self.src[self.pos..].starts_with(|c: char| c.is_ascii_alphabetic()) {
                    self.pos += 1;
                }
                match &self.src[start..self.pos] {
                    "answer" => Ok(TokenRef::Answer),
                    "wrong" => Ok(TokenRef::Wrong),
                    _ => {
                        self.pos = start;
                        Err(self.error("expected `answer`, `wrong`, a quoted token or `#id`"))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits() -> Tensor {
        Tensor::new(&[[1f32, 2., 3., 0.5], [0., -1., 4., 2.]], &Device::Cpu).unwrap()
    }

    #[test]
    fn built_in_metrics() {
        let l = logits();
        let d = Metric::logit_diff().eval(&l, &[2, 0], &[1, 3]).unwrap();
        assert_eq!(d.to_vec1::<f32>().unwrap(), vec![1.0, -2.0]);
        let p = Metric::prob().eval(&l, &[2, 2], &[0, 0]).unwrap();
        let row0: f32 = [1f32, 2., 3., 0.5].iter().map(|x| x.exp()).sum();
        assert!((p.to_vec1::<f32>().unwrap()[0] - 3f32.exp() / row0).abs() < 1e-6);
        assert!(!Metric::logit_diff().needs_softmax() && Metric::prob().needs_softmax());
    }

    #[test]
    fn expressions() {
        let l = logits();
        let m = Metric::parse("2 * (logit(answer) - logit(#3)) / 4 + -1", None).unwrap();
        assert!(m.is_linear() && !m.needs_softmax());
        let v = m
            .eval(&l, &[0, 2], &[1, 1])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(v, vec![(1.0 - 0.5) / 2.0 - 1.0, (4.0 - 2.0) / 2.0 - 1.0]);
        let m = Metric::parse("logprob(answer) - logprob(wrong)", None).unwrap();
        assert!(!m.is_linear());
        let v = m.eval(&l, &[2], &[1]).map(|_| ());
        assert!(
            v.is_err(),
            "one row of answers for two rows of logits is refused"
        );
        let v = m
            .eval(&l, &[2, 2], &[1, 1])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((v[0] - 1.0).abs() < 1e-5 && (v[1] - 5.0).abs() < 1e-5);
        assert!(!Metric::parse("logit(answer) * logit(wrong)", None)
            .unwrap()
            .is_linear());
    }

    #[test]
    fn bad_expressions_say_where() {
        for (text, needle) in [
            ("logit(answer", "missing `)`"),
            ("logits(answer)", "unknown name `logits`"),
            ("logit(bob)", "expected `answer`"),
            ("logit(\" Paris\")", "needs the model's tokenizer"),
            ("1 +", "ends early"),
            ("logit(answer) $", "unexpected"),
        ] {
            let e = Metric::parse(text, None).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let e = Metric::parse("logit(#99)", None)
            .unwrap()
            .eval(&logits(), &[0, 0], &[1, 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("99"), "{e}");
    }
}
