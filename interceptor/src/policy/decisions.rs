//! Numbers for decisions, so that what the kernel did can be attributed exactly.
//!
//! The agent writes each pod's modes into the kernel together with the number of the
//! [`Decision`] behind each mode, and the kernel copies that number into the events it
//! sends (a STRICT refusal, an accepted plaintext connection). The event thus names the
//! policy that was in force when the kernel acted, even if the policy changed since, or
//! the event waited in the pinned ring buffer while the agent was down. Numbers are never
//! reused, and the book is saved before a number reaches the kernel, so a restarted
//! agent can still read every number the kernel may hold.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Decision;

/// Decision ↔ number, both ways. Numbers start at 1; 0 means "not recorded" (values
/// written by an agent that did not number its decisions).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "Vec<Decision>", into = "Vec<Decision>")]
pub struct DecisionBook {
    /// Decision `n` is at index `n - 1`.
    decisions: Vec<Decision>,
    numbers: HashMap<Decision, u32>,
}

impl From<Vec<Decision>> for DecisionBook {
    fn from(decisions: Vec<Decision>) -> Self {
        let mut book = DecisionBook::default();
        for decision in decisions {
            book.number(&decision);
        }
        book
    }
}

impl From<DecisionBook> for Vec<Decision> {
    fn from(book: DecisionBook) -> Self {
        book.decisions
    }
}

impl DecisionBook {
    /// The number of `decision`, given a new one if it has none yet.
    pub fn number(&mut self, decision: &Decision) -> u32 {
        if let Some(number) = self.numbers.get(decision) {
            return *number;
        }
        self.decisions.push(decision.clone());
        let number = u32::try_from(self.decisions.len()).unwrap_or(u32::MAX);
        self.numbers.insert(decision.clone(), number);
        number
    }

    /// The decision numbered `number`, if this book gave that number.
    pub fn get(&self, number: u32) -> Option<&Decision> {
        let index = usize::try_from(number).ok()?.checked_sub(1)?;
        self.decisions.get(index)
    }

    /// How many numbers were given.
    pub fn len(&self) -> usize {
        self.decisions.len()
    }

    /// Whether no number was given yet.
    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Mode, PolicyRef};

    fn strict_by(name: &str) -> Decision {
        Decision {
            mode: Mode::Strict,
            policy: Some(PolicyRef {
                namespace: "ns".into(),
                name: name.into(),
            }),
        }
    }

    #[test]
    fn numbers_are_stable_and_survive_a_save() {
        let mut book = DecisionBook::default();
        assert_eq!(book.number(&strict_by("a")), 1);
        assert_eq!(book.number(&Decision::builtin_default()), 2);
        assert_eq!(book.number(&strict_by("a")), 1);
        assert_eq!(book.get(0), None);
        assert_eq!(book.get(3), None);
        let saved = serde_json::to_string(&book).unwrap();
        let mut restored: DecisionBook = serde_json::from_str(&saved).unwrap();
        assert_eq!(restored, book);
        assert_eq!(restored.get(1), Some(&strict_by("a")));
        assert_eq!(restored.number(&strict_by("b")), 3);
    }
}
