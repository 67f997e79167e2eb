//! JSON shapes whose size is checked while they are parsed: a list longer
//! than its bound is refused at the item past it, so a 64 MiB body of tiny
//! items cannot make millions of allocations first. (serde's `untagged` and
//! `flatten` buffer a whole value before choosing, so none is used on the
//! request types.)

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

/// Texts in one request, at most: the serving takes at most
/// `HARNESS_MAX_QUEUE` anyway, and says so.
pub const MAX_TEXTS: usize = 65_536;
/// Stop strings in one request.
pub const MAX_STOPS: usize = 16;
/// Messages in one chat, and content parts in one message.
pub const MAX_MESSAGES: usize = 4096;

/// One text or a list of at most `N` (OpenAI's and text-embeddings-inference's
/// `input`, `inputs`, `prompt`, `stop`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany<const N: usize>(pub Vec<String>);

impl<'de, const N: usize> Deserialize<'de> for OneOrMany<N> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Texts<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for Texts<N> {
            type Value = OneOrMany<N>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a string or a list of at most {N} strings")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(OneOrMany(vec![text.to_string()]))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(OneOrMany(vec![text]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                bounded_seq::<String, A, N>(seq, "strings (token ids are not taken: send the text)")
                    .map(OneOrMany)
            }
        }
        de.deserialize_any(Texts::<N>)
    }
}

/// A list of at most `N` items.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounded<T, const N: usize>(pub Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct List<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for List<T, N> {
            type Value = Bounded<T, N>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {N} items")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                bounded_seq::<T, A, N>(seq, "items").map(Bounded)
            }
        }
        de.deserialize_seq(List::<T, N>(PhantomData))
    }
}

/// The items of `seq`, refused at the one past `N`; `what` names them in the
/// error when one does not parse.
pub fn bounded_seq<'de, T: Deserialize<'de>, A: SeqAccess<'de>, const N: usize>(
    mut seq: A,
    what: &str,
) -> Result<Vec<T>, A::Error> {
    let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N).min(1024));
    loop {
        let item = seq
            .next_element::<T>()
            .map_err(|err| de::Error::custom(format!("expected a list of {what}: {err}")))?;
        let Some(item) = item else {
            return Ok(items);
        };
        if items.len() == N {
            return Err(de::Error::custom(format!(
                "a list of more than {N} {what}; send at most {N}"
            )));
        }
        items.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_many_takes_a_string_or_a_bounded_list_of_strings() {
        let one: OneOrMany<2> = serde_json::from_str(r#""a""#).unwrap();
        assert_eq!(one.0, ["a"]);
        let two: OneOrMany<2> = serde_json::from_str(r#"["a", "b"]"#).unwrap();
        assert_eq!(two.0, ["a", "b"]);
        let three = serde_json::from_str::<OneOrMany<2>>(r#"["a", "b", "c"]"#).unwrap_err();
        assert!(three.to_string().contains("more than 2"), "{three}");
        let ids = serde_json::from_str::<OneOrMany<2>>("[1, 2]").unwrap_err();
        assert!(ids.to_string().contains("token ids are not taken"), "{ids}");
        let number = serde_json::from_str::<OneOrMany<2>>("7").unwrap_err();
        assert!(
            number.to_string().contains("a string or a list"),
            "{number}"
        );
    }

    #[test]
    fn bounded_stops_at_the_item_past_its_bound() {
        let ok: Bounded<u32, 3> = serde_json::from_str("[1, 2, 3]").unwrap();
        assert_eq!(ok.0, [1, 2, 3]);
        assert!(serde_json::from_str::<Bounded<u32, 3>>("[1, 2, 3, 4]").is_err());
    }
}
