//! Linda tuples and templates: typed fields, matching, construction macros and typed extraction.
//!
//! A tuple is an ordered list of typed values; a template is an ordered list of fields, each an actual value
//! (matches an equal value of the same type) or a typed formal (matches any value of that type). A template
//! matches a tuple of the same arity whose every field matches. Floats match by bit pattern, so a template
//! matches exactly the value put in.
//!
//! ```
//! use dsm_runtime::{tuple, template};
//! let t = tuple!("task", 3, 2.5);
//! assert!(template!("task", ?i64, ?f64).matches(&t));
//! assert_eq!(t.get::<i64>(1).unwrap(), 3);
//! ```
//!
//! Limits, checked when a tuple or template enters the space: at most [`MAX_FIELDS`] fields, at most
//! [`MAX_FIELD_BYTES`] bytes in one string or byte-string field, and at most [`MAX_TUPLE_BYTES`] in all of
//! them together.

use serde::{Deserialize, Serialize};
use std::hash::{Hash, Hasher};

/// The most fields a tuple or template may have.
pub const MAX_FIELDS: usize = 16;
/// The largest string or byte-string field, in bytes.
pub const MAX_FIELD_BYTES: usize = 1 << 20;
/// The most bytes of strings and byte strings one tuple or template holds in all (so that any tuple fits
/// in one request to its home, with room to spare).
pub const MAX_TUPLE_BYTES: usize = 8 << 20;

/// Errors of building, checking and reading tuples.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TupleError {
    /// Too many fields.
    #[error("{0} fields: a tuple or template has at most {MAX_FIELDS}")]
    TooManyFields(usize),
    /// A string or byte string is too large.
    #[error("field {index} holds {len} bytes: a field holds at most {MAX_FIELD_BYTES}; put large data in a shared region and pass its index")]
    FieldTooLarge {
        /// The field.
        index: usize,
        /// Its size.
        len: usize,
    },
    /// The strings and byte strings together are too large.
    #[error("{0} bytes of strings and byte strings: a tuple or template holds at most {MAX_TUPLE_BYTES} in all; put large data in a shared region and pass its index")]
    TooLarge(usize),
    /// No field at this index.
    #[error("field {index} does not exist: the tuple has {arity} fields")]
    NoSuchField {
        /// The index asked for.
        index: usize,
        /// The tuple's arity.
        arity: usize,
    },
    /// The field holds another type.
    #[error("field {index} is {found:?}, not {wanted:?}")]
    TypeMismatch {
        /// The field.
        index: usize,
        /// Its type.
        found: Kind,
        /// The type asked for.
        wanted: Kind,
    },
}

/// The type of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// `i64` (also built from smaller signed integers).
    I64,
    /// `u64` (also built from smaller unsigned integers and `usize`).
    U64,
    /// `f64`.
    F64,
    /// UTF-8 string.
    Str,
    /// Byte string.
    Bytes,
    /// Boolean.
    Bool,
}

/// A field's value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Value {
    /// A signed integer.
    I64(i64),
    /// An unsigned integer.
    U64(u64),
    /// A float.
    F64(f64),
    /// A string.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A boolean.
    Bool(bool),
}

impl Value {
    /// The value's type.
    pub fn kind(&self) -> Kind {
        match self {
            Value::I64(_) => Kind::I64,
            Value::U64(_) => Kind::U64,
            Value::F64(_) => Kind::F64,
            Value::Str(_) => Kind::Str,
            Value::Bytes(_) => Kind::Bytes,
            Value::Bool(_) => Kind::Bool,
        }
    }

    /// The bytes of a string or byte string (0 for other types).
    pub(crate) fn byte_len(&self) -> usize {
        match self {
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            _ => 0,
        }
    }
}

// Floats compare by bit pattern: a template finds exactly the value that was put in (NaN included).
impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::I64(a), Value::I64(b)) => a == b,
            (Value::U64(a), Value::U64(b)) => a == b,
            (Value::F64(a), Value::F64(b)) => a.to_bits() == b.to_bits(),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Bytes(a), Value::Bytes(b)) => a == b,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.kind().hash(h);
        match self {
            Value::I64(v) => v.hash(h),
            Value::U64(v) => v.hash(h),
            Value::F64(v) => v.to_bits().hash(h),
            Value::Str(v) => v.hash(h),
            Value::Bytes(v) => v.hash(h),
            Value::Bool(v) => v.hash(h),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident as $as:ty),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Value {
                Value::$variant(v as $as)
            }
        }
    )*};
}
value_from!(i64 => I64 as i64, i32 => I64 as i64, i16 => I64 as i64, i8 => I64 as i64,
            u64 => U64 as u64, u32 => U64 as u64, u16 => U64 as u64, u8 => U64 as u64, usize => U64 as u64,
            f64 => F64 as f64, f32 => F64 as f64);

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Str(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Str(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Bytes(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Bytes(v.to_vec())
    }
}

/// A Rust type that a field can hold: the formal of a template (`?i64`) and the target of extraction.
pub trait Typed: Sized {
    /// The field type.
    const KIND: Kind;
    /// The value, when the field has this type.
    fn from_value(v: &Value) -> Option<Self>;
}

macro_rules! typed {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl Typed for $t {
            const KIND: Kind = Kind::$variant;
            fn from_value(v: &Value) -> Option<Self> {
                match v {
                    Value::$variant(x) => Some(x.clone()),
                    _ => None,
                }
            }
        }
    )*};
}
typed!(i64 => I64, u64 => U64, f64 => F64, String => Str, Vec<u8> => Bytes, bool => Bool);

/// A tuple: ordered typed values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tuple(pub Vec<Value>);

impl Tuple {
    /// The number of fields.
    pub fn arity(&self) -> usize {
        self.0.len()
    }

    /// Field `index` as `T`: an error (never a panic) when it does not exist or holds another type.
    pub fn get<T: Typed>(&self, index: usize) -> Result<T, TupleError> {
        let v = self.0.get(index).ok_or(TupleError::NoSuchField {
            index,
            arity: self.arity(),
        })?;
        T::from_value(v).ok_or(TupleError::TypeMismatch {
            index,
            found: v.kind(),
            wanted: T::KIND,
        })
    }

    /// Checks the limits.
    pub fn check(&self) -> Result<(), TupleError> {
        check_fields(
            self.0.len(),
            self.0.iter().enumerate().map(|(i, v)| (i, v.byte_len())),
        )
    }

    /// The bytes of its strings and byte strings (what [`MAX_TUPLE_BYTES`] bounds).
    pub(crate) fn byte_len(&self) -> usize {
        self.0.iter().map(Value::byte_len).sum()
    }
}

fn check_fields(n: usize, sizes: impl Iterator<Item = (usize, usize)>) -> Result<(), TupleError> {
    if n > MAX_FIELDS {
        return Err(TupleError::TooManyFields(n));
    }
    let mut total = 0usize;
    for (index, len) in sizes {
        if len > MAX_FIELD_BYTES {
            return Err(TupleError::FieldTooLarge { index, len });
        }
        total += len;
    }
    if total > MAX_TUPLE_BYTES {
        return Err(TupleError::TooLarge(total));
    }
    Ok(())
}

/// A field of a template.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Field {
    /// Matches an equal value.
    Actual(Value),
    /// Matches any value of this type.
    Formal(Kind),
}

impl Field {
    fn matches(&self, v: &Value) -> bool {
        match self {
            Field::Actual(a) => a == v,
            Field::Formal(k) => *k == v.kind(),
        }
    }
}

/// A template: what `in`, `rd`, `inp`, `rdp` and `count` look for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Template(pub Vec<Field>);

impl Template {
    /// The number of fields.
    pub fn arity(&self) -> usize {
        self.0.len()
    }

    /// Whether `t` matches.
    pub fn matches(&self, t: &Tuple) -> bool {
        self.0.len() == t.0.len() && self.0.iter().zip(&t.0).all(|(f, v)| f.matches(v))
    }

    /// The first field and arity of the tuples this template can match, when those are one home's (and
    /// one bucket's there): for a template whose first field is given, and for the template of no field.
    /// `None` for one whose first field is formal, whose tuples may be at any rank.
    pub(crate) fn homed_by(&self) -> Option<(Option<&Value>, usize)> {
        match self.0.first() {
            Some(Field::Actual(v)) => Some((Some(v), self.arity())),
            Some(_) => None,
            None => Some((None, 0)),
        }
    }

    /// The first field when it is an actual value (the fast, indexed case).
    pub fn first_actual(&self) -> Option<&Value> {
        match self.0.first() {
            Some(Field::Actual(v)) => Some(v),
            _ => None,
        }
    }

    /// Checks the limits.
    pub fn check(&self) -> Result<(), TupleError> {
        check_fields(
            self.0.len(),
            self.0.iter().enumerate().map(|(i, f)| match f {
                Field::Actual(v) => (i, v.byte_len()),
                Field::Formal(_) => (i, 0),
            }),
        )
    }
}

/// Builds a [`Tuple`]: `tuple!("task", 3, 2.5)`. Each field converts with `Value::from`.
#[macro_export]
macro_rules! tuple {
    ($($e:expr),* $(,)?) => {
        $crate::tuple::Tuple(vec![$($crate::tuple::Value::from($e)),*])
    };
}

/// Builds a [`Template`]: `template!("task", ?i64, 2.5)`. `?T` is a formal of type `T` (`i64`, `u64`, `f64`,
/// `String`, `Vec<u8>`, `bool`); anything else is an actual value, converted with `Value::from`.
#[macro_export]
macro_rules! template {
    (@acc [$($out:expr),*]) => {
        $crate::tuple::Template(vec![$($out),*])
    };
    (@acc [$($out:expr),*] ? $t:ty $(, $($rest:tt)*)?) => {
        $crate::template!(@acc [$($out,)* $crate::tuple::Field::Formal(<$t as $crate::tuple::Typed>::KIND)] $($($rest)*)?)
    };
    (@acc [$($out:expr),*] $e:expr $(, $($rest:tt)*)?) => {
        $crate::template!(@acc [$($out,)* $crate::tuple::Field::Actual($crate::tuple::Value::from($e))] $($($rest)*)?)
    };
    ($($rest:tt)*) => {
        $crate::template!(@acc [] $($rest)*)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macros_build_what_they_say() {
        let t = tuple!("task", 3, 2.5, true, vec![1u8, 2], 7u32);
        assert_eq!(t.arity(), 6);
        assert_eq!(t.get::<String>(0).unwrap(), "task");
        assert_eq!(t.get::<i64>(1).unwrap(), 3);
        assert_eq!(t.get::<f64>(2).unwrap(), 2.5);
        assert!(t.get::<bool>(3).unwrap());
        assert_eq!(t.get::<Vec<u8>>(4).unwrap(), vec![1, 2]);
        assert_eq!(t.get::<u64>(5).unwrap(), 7);
        let p = template!("task", ?i64, ?f64, true, ?Vec<u8>, 7u32);
        assert!(p.matches(&t));
        assert_eq!(p.first_actual(), Some(&Value::from("task")));
        assert!(template!(?String, ?i64, ?f64, ?bool, ?Vec<u8>, ?u64).matches(&t));
        assert_eq!(template!().arity(), 0);
        assert_eq!(template!(?i64).arity(), 1);
    }

    #[test]
    fn matching_needs_same_arity_types_and_values() {
        let t = tuple!("a", 1);
        assert!(!template!("a").matches(&t), "arity");
        assert!(!template!("a", ?u64).matches(&t), "signed is not unsigned");
        assert!(!template!("a", 2).matches(&t), "value");
        assert!(!template!("b", ?i64).matches(&t), "first field");
        assert!(template!(?String, 1).matches(&t));
        let nan = tuple!(f64::NAN);
        assert!(template!(f64::NAN).matches(&nan), "floats match by bits");
    }

    #[test]
    fn extraction_errors_are_errors() {
        let t = tuple!("a", 1);
        assert_eq!(
            t.get::<i64>(5),
            Err(TupleError::NoSuchField { index: 5, arity: 2 })
        );
        assert_eq!(
            t.get::<f64>(1),
            Err(TupleError::TypeMismatch {
                index: 1,
                found: Kind::I64,
                wanted: Kind::F64
            })
        );
        assert!(t
            .get::<f64>(1)
            .unwrap_err()
            .to_string()
            .contains("field 1 is I64"));
    }

    #[test]
    fn limits_are_checked() {
        let many = Tuple((0..17).map(Value::from).collect());
        assert_eq!(many.check(), Err(TupleError::TooManyFields(17)));
        let big = tuple!(vec![0u8; MAX_FIELD_BYTES + 1]);
        assert!(matches!(
            big.check(),
            Err(TupleError::FieldTooLarge { index: 0, .. })
        ));
        assert!(big
            .check()
            .unwrap_err()
            .to_string()
            .contains("shared region"));
        assert!(tuple!("ok", 1).check().is_ok());
        // Each field within its limit, all of them together over the tuple's.
        let field = vec![0u8; MAX_FIELD_BYTES];
        let heavy = Tuple((0..9).map(|_| Value::from(field.clone())).collect());
        assert_eq!(
            heavy.check(),
            Err(TupleError::TooLarge(9 * MAX_FIELD_BYTES))
        );
        let fits = Tuple((0..8).map(|_| Value::from(field.clone())).collect());
        assert!(fits.check().is_ok());
        assert_eq!(
            Template(vec![Field::Formal(Kind::I64); 20]).check(),
            Err(TupleError::TooManyFields(20))
        );
    }
}
