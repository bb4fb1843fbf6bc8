//! Walking two name-keyed maps side by side, in one pass.

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::sync::Arc;

/// Where a key was found.
#[derive(Debug)]
pub enum Side<'a, A, B> {
    Left(&'a String, &'a A),
    Right(&'a String, &'a B),
    Both(&'a String, &'a A, &'a B),
}

#[derive(Debug)]
pub struct Merge<'a, A, B> {
    left: Peekable<std::collections::btree_map::Iter<'a, String, A>>,
    right: Peekable<std::collections::btree_map::Iter<'a, String, B>>,
}

impl<'a, A, B> Iterator for Merge<'a, A, B> {
    type Item = Side<'a, A, B>;

    fn next(&mut self) -> Option<Self::Item> {
        let order = match (self.left.peek(), self.right.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        Some(match order {
            std::cmp::Ordering::Less => {
                let (k, a) = self.left.next()?;
                Side::Left(k, a)
            }
            std::cmp::Ordering::Greater => {
                let (k, b) = self.right.next()?;
                Side::Right(k, b)
            }
            std::cmp::Ordering::Equal => {
                let (k, a) = self.left.next()?;
                let (_, b) = self.right.next()?;
                Side::Both(k, a, b)
            }
        })
    }
}

/// Every key of either map, in order, with the values it has on each side.
pub fn merge<'a, A, B>(left: &'a BTreeMap<String, A>, right: &'a BTreeMap<String, B>) -> Merge<'a, A, B> {
    Merge { left: left.iter().peekable(), right: right.iter().peekable() }
}

/// Where two maps of shared objects differ: names on one side only, and
/// names whose objects are neither the same one nor equal.
///
/// Two snapshots of one intent share nearly every object: while both maps
/// are as long and hold the same object at the same place, the names are
/// not compared (an object is kept under its own name, so the same object
/// means the same name) — reading 10,000 names on both sides costs more
/// than the rest of the walk. The first place they differ in name falls
/// back to [`merge`], which compares every name.
pub fn differing<'a, T: Eq>(
    old: &'a BTreeMap<String, Arc<T>>,
    new: &'a BTreeMap<String, Arc<T>>,
) -> Vec<Side<'a, Arc<T>, Arc<T>>> {
    if old.len() == new.len() {
        let mut out = Vec::new();
        let mut aligned = true;
        for ((ka, a), (kb, b)) in old.iter().zip(new.iter()) {
            if Arc::ptr_eq(a, b) {
                continue;
            }
            if ka != kb {
                aligned = false;
                break;
            }
            if a != b {
                out.push(Side::Both(ka, a, b));
            }
        }
        if aligned {
            return out;
        }
    }
    merge(old, new).filter(|side| !matches!(side, Side::Both(_, a, b) if a == b)).collect()
}

/// The names of `old` that `new` has not (see [`differing`]).
pub fn removed<'a, T: Eq>(old: &'a BTreeMap<String, Arc<T>>, new: &'a BTreeMap<String, Arc<T>>) -> Vec<&'a String> {
    differing(old, new)
        .into_iter()
        .filter_map(|side| match side {
            Side::Left(name, _) => Some(name),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visits_every_key_once_in_order() {
        let a: BTreeMap<String, i32> = [("a", 1), ("c", 3), ("d", 4)].map(|(k, v)| (k.to_string(), v)).into();
        let b: BTreeMap<String, i32> = [("b", 2), ("c", 30)].map(|(k, v)| (k.to_string(), v)).into();
        let seen: Vec<String> = merge(&a, &b)
            .map(|s| match s {
                Side::Left(k, v) => format!("{k}<{v}"),
                Side::Right(k, v) => format!("{k}>{v}"),
                Side::Both(k, x, y) => format!("{k}={x},{y}"),
            })
            .collect();
        assert_eq!(seen, ["a<1", "b>2", "c=3,30", "d<4"]);
    }

    #[test]
    fn removed_names_are_those_only_the_old_map_has() {
        let shared = Arc::new(1);
        let old: BTreeMap<String, Arc<i32>> =
            [("a", &shared), ("b", &Arc::new(2)), ("c", &Arc::new(3))].map(|(k, v)| (k.to_string(), v.clone())).into();
        let new: BTreeMap<String, Arc<i32>> =
            [("a", &shared), ("c", &Arc::new(30)), ("d", &Arc::new(4))].map(|(k, v)| (k.to_string(), v.clone())).into();
        assert_eq!(removed(&old, &new), ["b"]);
        assert!(removed(&old, &old.clone()).is_empty());
    }
}
