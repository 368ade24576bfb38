//! Plan 9 mk(1): parser and evaluator.
