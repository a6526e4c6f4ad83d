//! Building multi-row statements that both backends accept, and run fast on both.
//!
//! Generated statements are written with anonymous `?` placeholders. SQLite keeps them: it treats
//! `$n` as a *named* parameter, and both its parser and sqlx's binder look each name up in a
//! list of the names before it, which made a 2,000-parameter statement quadratic (a profile of
//! issuance found 20% of the writer thread in those look-ups). PostgreSQL needs `$1, $2, ..`,
//! so [`spell`] numbers them there.

use sqlx::AnyConnection;

/// Bound parameters per statement: under SQLite's limit (32,766) and PostgreSQL's (65,535).
const MAX_PARAMETERS: usize = 30_000;

/// How many rows of `columns` values one statement may carry.
pub(super) fn rows_per_statement(columns: usize) -> usize {
    (MAX_PARAMETERS / columns).max(1)
}

/// `(?, ?, ..), (?, ..), ..`: placeholders for `rows` rows of `columns` values.
pub(super) fn placeholder_rows(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

/// Whether `connection` is to SQLite, where the broker's one writer connection is the only
/// writer of the database.
pub(super) fn is_sqlite(connection: &AnyConnection) -> bool {
    connection.backend_name().eq_ignore_ascii_case("sqlite")
}

/// `sql`, whose parameters are all `?`, as `connection`'s backend expects it.
pub(super) fn spell(connection: &AnyConnection, sql: String) -> String {
    if is_sqlite(connection) {
        return sql;
    }
    let mut numbered = String::with_capacity(sql.len() + sql.len() / 4);
    let mut next = 0;
    for (index, part) in sql.split('?').enumerate() {
        if index > 0 {
            next += 1;
            numbered.push('$');
            numbered.push_str(&next.to_string());
        }
        numbered.push_str(part);
    }
    numbered
}

#[cfg(test)]
mod tests {
    use super::placeholder_rows;

    #[test]
    fn placeholder_rows_has_one_marker_per_value() {
        assert_eq!(placeholder_rows(2, 3), "(?, ?, ?), (?, ?, ?)");
    }
}
