//! Building multi-row statements that both backends accept.

/// Bound parameters per statement: under SQLite's limit (32,766) and PostgreSQL's (65,535).
const MAX_PARAMETERS: usize = 30_000;

/// How many rows of `columns` values one statement may carry.
pub(super) fn rows_per_statement(columns: usize) -> usize {
    (MAX_PARAMETERS / columns).max(1)
}

/// `($1, $2, ..), ($k+1, ..), ..`: placeholders for `rows` rows of `columns` values.
pub(super) fn placeholder_rows(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|row| {
            let values: Vec<String> = (1..=columns)
                .map(|column| format!("${}", row * columns + column))
                .collect();
            format!("({})", values.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
