//! Cell suppression: which rows of one window's table a study may see.
//!
//! A window's release for one metric has fine cells (one per combination of
//! generalized quasi-identifiers), one-way margins (one per attribute and
//! value, when the study groups by two or more attributes) and a grand total.
//! [`plan`] decides which of them may be published so that every published
//! row counts at least `k` distinct patients and no hidden row can be
//! recomputed from the published ones:
//!
//! - primary suppression hides every row with `0 < patients < k`;
//! - complementary suppression (Hundepool et al., *Statistical Disclosure
//!   Control*, Wiley 2012, §6.2–6.3; Cox 1980, "Properties of the sensitive
//!   cell suppression problem") hides more rows, first by a group heuristic
//!   (no published total may leave a single hidden member, or hidden members
//!   summing to less than `k`), then by an exact linear audit repeated until
//!   no hidden row lies in the span of the published equations.
//!
//! Known limit: only exact linear disclosure is audited. Counts are
//! non-negative, so published rows also bound hidden ones (interval
//! disclosure, Cox 1980); those bounds are not audited here. The release adds
//! differential-privacy noise on top of every published count.

use std::collections::BTreeMap;

/// One fine cell: its attribute values and its true distinct-patient count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellCount {
    pub key: Vec<String>,
    pub patients: u64,
}

/// What may be published.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Per input fine cell (same order as given): published?
    ///
    /// With no attributes the single cell is the grand total and mirrors
    /// [`Plan::total`]; [`Plan::published`] then lists it once, as the total.
    pub cells: Vec<bool>,
    /// Margins (attribute index, value) -> (patients, published?). Empty when attributes < 2.
    pub margins: BTreeMap<(usize, String), (u64, bool)>,
    /// The grand total's patients and whether it is published.
    pub total: (u64, bool),
    /// How many rows were suppressed by the k rule, and how many more to protect them.
    pub primary: usize,
    pub complementary: usize,
}

impl Plan {
    /// Every published row as (key with "*" for marginalized attributes, patients): fine cells, then margins, then the total. For the engine to iterate over.
    pub fn published<'a>(
        &'a self,
        cells: &'a [CellCount],
        attributes: usize,
    ) -> Vec<(Vec<String>, u64)> {
        let mut rows = Vec::new();
        if attributes >= 1 {
            for (cell, &published) in cells.iter().zip(&self.cells) {
                if published {
                    rows.push((cell.key.clone(), cell.patients));
                }
            }
        }
        for ((attribute, value), &(patients, published)) in &self.margins {
            if published {
                let mut key = vec!["*".to_owned(); attributes];
                key[*attribute] = value.clone();
                rows.push((key, patients));
            }
        }
        if self.total.1 {
            rows.push((vec!["*".to_owned(); attributes], self.total.0));
        }
        rows
    }
}

/// Decides which rows of one window's table may be published. Rows with 0 patients are never published and never counted.
///
/// Primary suppression first; then, until the exact audit passes, the group
/// heuristic to a fixed point and one audit-driven complement per round. The
/// heuristic runs again after each audit complement so that a complement
/// chosen for the audit cannot leave a published total with a small hidden
/// remainder.
///
/// # Panics
///
/// If a key does not hold `attributes` values, or if `attributes == 0` and
/// more than one cell is given.
pub fn plan(cells: &[CellCount], attributes: usize, k: u64) -> Plan {
    let mut table = Table::new(cells, attributes);
    table.suppress_primary(k);
    loop {
        table.protect_groups(k);
        let Some(disclosed) = table.first_disclosed() else {
            break;
        };
        // A disclosure needs a published equation, so a complement exists.
        let Some(complement) = table.choose_complement(disclosed) else {
            break;
        };
        table.suppress(complement);
    }
    table.into_plan()
}

/// A row's life in the plan: empty rows are never published nor counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Empty,
    Published,
    Suppressed,
}

/// Which published row of the release a table row is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Label {
    Cell(usize),
    Margin(usize, String),
    Total,
}

impl Label {
    /// Complement preference: fine cells, then margins, then the total.
    fn rank(&self) -> u8 {
        match self {
            Label::Cell(_) => 0,
            Label::Margin(..) => 1,
            Label::Total => 2,
        }
    }
}

/// One row of the release with the non-empty fine cells it sums.
#[derive(Debug, Clone)]
struct Row {
    label: Label,
    patients: u64,
    support: Vec<usize>,
    state: State,
}

impl Row {
    fn new(label: Label, patients: u64, support: Vec<usize>) -> Self {
        let state = if patients == 0 {
            State::Empty
        } else {
            State::Published
        };
        Row {
            label,
            patients,
            support,
            state,
        }
    }
}

/// A total and the rows that add up to it (Hundepool et al. §6.3: each
/// published total is one linear relation an intruder can subtract from).
#[derive(Debug, Clone)]
struct Group {
    members: Vec<usize>,
    total: usize,
}

/// The rows of one window's table, in tie-break order: fine cells by key,
/// margins by (attribute, value), the total last.
#[derive(Debug, Clone)]
struct Table {
    rows: Vec<Row>,
    groups: Vec<Group>,
    cell_patients: Vec<u64>,
    attributes: usize,
    primary: usize,
    complementary: usize,
}

impl Table {
    fn new(cells: &[CellCount], attributes: usize) -> Self {
        for cell in cells {
            assert_eq!(
                cell.key.len(),
                attributes,
                "cell key {:?} should hold {attributes} attribute values",
                cell.key
            );
        }
        assert!(
            attributes > 0 || cells.len() <= 1,
            "with no attributes the table holds at most one cell, got {}",
            cells.len()
        );
        let non_empty = |i: &usize| cells[*i].patients > 0;
        let mut rows = Vec::new();
        let mut groups = Vec::new();

        let mut order: Vec<usize> = (0..cells.len()).collect();
        order.sort_by(|&a, &b| cells[a].key.cmp(&cells[b].key).then(a.cmp(&b)));
        if attributes >= 1 {
            for &i in &order {
                rows.push(Row::new(
                    Label::Cell(i),
                    cells[i].patients,
                    Some(i).filter(non_empty).into_iter().collect(),
                ));
            }
        }
        let cell_rows = rows.len();

        if attributes >= 2 {
            let mut margins: BTreeMap<(usize, String), Vec<usize>> = BTreeMap::new();
            for (row, &i) in order.iter().enumerate() {
                for (attribute, value) in cells[i].key.iter().enumerate() {
                    margins
                        .entry((attribute, value.clone()))
                        .or_default()
                        .push(row);
                }
            }
            for ((attribute, value), members) in margins {
                let patients = members.iter().map(|&m| rows[m].patients).sum();
                let support = members.iter().flat_map(|&m| rows[m].support.clone());
                let total = rows.len();
                rows.push(Row::new(
                    Label::Margin(attribute, value),
                    patients,
                    support.collect(),
                ));
                groups.push(Group { members, total });
            }
        }

        let total = rows.len();
        rows.push(Row::new(
            Label::Total,
            cells.iter().map(|c| c.patients).sum(),
            (0..cells.len()).filter(non_empty).collect(),
        ));
        if attributes == 1 {
            groups.push(Group {
                members: (0..cell_rows).collect(),
                total,
            });
        }
        for attribute in (0..attributes).filter(|_| attributes >= 2) {
            let members = (cell_rows..total)
                .filter(|&m| matches!(rows[m].label, Label::Margin(a, _) if a == attribute))
                .collect();
            groups.push(Group { members, total });
        }

        Table {
            rows,
            groups,
            cell_patients: cells.iter().map(|c| c.patients).collect(),
            attributes,
            primary: 0,
            complementary: 0,
        }
    }

    /// Primary suppression: the k rule on every non-empty row.
    fn suppress_primary(&mut self, k: u64) {
        for row in &mut self.rows {
            if row.state == State::Published && row.patients < k {
                row.state = State::Suppressed;
                self.primary += 1;
            }
        }
    }

    fn suppress(&mut self, row: usize) {
        debug_assert_eq!(self.rows[row].state, State::Published);
        self.rows[row].state = State::Suppressed;
        self.complementary += 1;
    }

    /// The group heuristic, to a fixed point.
    fn protect_groups(&mut self, k: u64) {
        while let Some(row) = self.group_complement(k) {
            self.suppress(row);
        }
    }

    /// The next complement the group heuristic asks for: in a group whose
    /// total is published, a single hidden member is its total minus the
    /// rest, and hidden members summing to less than `k` reveal a sum below
    /// `k`. Hide the smallest published member, else the total.
    fn group_complement(&self, k: u64) -> Option<usize> {
        for group in &self.groups {
            if self.rows[group.total].state != State::Published {
                continue;
            }
            let hidden: Vec<usize> = self.in_state(&group.members, State::Suppressed);
            let hidden_sum: u64 = hidden.iter().map(|&m| self.rows[m].patients).sum();
            if hidden.is_empty() || (hidden.len() >= 2 && hidden_sum >= k) {
                continue;
            }
            let smallest = self
                .in_state(&group.members, State::Published)
                .into_iter()
                .min_by_key(|&m| (self.rows[m].patients, m));
            return Some(smallest.unwrap_or(group.total));
        }
        None
    }

    fn in_state(&self, rows: &[usize], state: State) -> Vec<usize> {
        rows.iter()
            .copied()
            .filter(|&r| self.rows[r].state == state)
            .collect()
    }

    /// The audit's unknowns: per input cell, its column if it is non-empty
    /// and no published row gives it alone.
    fn unknowns(&self) -> Vec<Option<usize>> {
        let mut known = vec![false; self.cell_patients.len()];
        for row in &self.rows {
            if let (Label::Cell(i), State::Published) = (&row.label, row.state) {
                known[*i] = true;
            }
        }
        let mut next = 0;
        (0..known.len())
            .map(|i| {
                (self.cell_patients[i] > 0 && !known[i]).then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect()
    }

    /// A row's coefficients over the unknowns (known cells move to the
    /// constant side of its equation).
    fn coefficients(&self, row: usize, unknowns: &[Option<usize>]) -> Vec<i128> {
        let width = unknowns.iter().flatten().count();
        let mut vector = vec![0; width];
        for &cell in &self.rows[row].support {
            if let Some(column) = unknowns[cell] {
                vector[column] = 1;
            }
        }
        vector
    }

    /// The published equations in echelon form; `None` on overflow.
    fn published_span(&self, unknowns: &[Option<usize>]) -> Option<Echelon> {
        let mut span = Echelon::default();
        for row in 0..self.rows.len() {
            let touches = self.rows[row]
                .support
                .iter()
                .any(|&c| unknowns[c].is_some());
            if self.rows[row].state == State::Published && touches {
                span.insert(self.coefficients(row, unknowns))?;
            }
        }
        Some(span)
    }

    /// The exact audit: the first suppressed row whose coefficients lie in
    /// the row space of the published equations. Arithmetic overflow counts
    /// as disclosure, so the audit errs towards hiding more.
    fn first_disclosed(&self) -> Option<usize> {
        let unknowns = self.unknowns();
        let span = self.published_span(&unknowns);
        (0..self.rows.len()).find(|&row| {
            self.rows[row].state == State::Suppressed
                && span.as_ref().is_none_or(|span| {
                    span.spans(self.coefficients(row, &unknowns))
                        .unwrap_or(true)
                })
        })
    }

    fn is_disclosed(&self, row: usize) -> bool {
        let unknowns = self.unknowns();
        self.published_span(&unknowns).is_none_or(|span| {
            span.spans(self.coefficients(row, &unknowns))
                .unwrap_or(true)
        })
    }

    /// A published row to hide for the disclosed `row`: one sharing a group
    /// with it (else one summing some of its cells, else any), preferring
    /// fine cells, then margins, then the total, fewest patients first; the
    /// first of these whose suppression alone hides `row`, else the first.
    fn choose_complement(&mut self, row: usize) -> Option<usize> {
        let published: Vec<usize> = (0..self.rows.len())
            .filter(|&r| self.rows[r].state == State::Published)
            .collect();
        let in_group = |g: &Group, r: usize| g.total == r || g.members.contains(&r);
        let shares_group = |q: &usize| {
            self.groups
                .iter()
                .any(|g| in_group(g, row) && in_group(g, *q))
        };
        let overlaps = |q: &usize| {
            let support = &self.rows[row].support;
            self.rows[*q].support.iter().any(|c| support.contains(c))
        };
        let mut candidates: Vec<usize> = published.iter().copied().filter(shares_group).collect();
        if candidates.is_empty() {
            candidates = published.iter().copied().filter(overlaps).collect();
        }
        if candidates.is_empty() {
            candidates = published;
        }
        candidates.sort_by_key(|&q| (self.rows[q].label.rank(), self.rows[q].patients, q));
        for &candidate in &candidates {
            self.rows[candidate].state = State::Suppressed;
            let hides = !self.is_disclosed(row);
            self.rows[candidate].state = State::Published;
            if hides {
                return Some(candidate);
            }
        }
        candidates.first().copied()
    }

    fn into_plan(self) -> Plan {
        let mut plan = Plan {
            cells: vec![false; self.cell_patients.len()],
            primary: self.primary,
            complementary: self.complementary,
            ..Plan::default()
        };
        for row in self.rows {
            let published = row.state == State::Published;
            match row.label {
                Label::Cell(i) => plan.cells[i] = published,
                Label::Margin(attribute, value) => {
                    plan.margins
                        .insert((attribute, value), (row.patients, published));
                }
                Label::Total => {
                    plan.total = (row.patients, published);
                    if self.attributes == 0 {
                        plan.cells.fill(published);
                    }
                }
            }
        }
        plan
    }
}

/// Integer row echelon form, each row kept primitive (divided by the gcd of
/// its entries) so the 0/1 equations stay small; exact, unlike a float
/// tolerance. `None` from any method means `i128` overflowed.
#[derive(Debug, Default)]
struct Echelon {
    /// (pivot column, row), sorted by pivot; zero before each pivot.
    rows: Vec<(usize, Vec<i128>)>,
}

impl Echelon {
    /// `vector` minus its components along the basis; zero at every pivot.
    fn reduce(&self, mut vector: Vec<i128>) -> Option<Vec<i128>> {
        for (pivot, basis) in &self.rows {
            let x = vector[*pivot];
            if x == 0 {
                continue;
            }
            let y = basis[*pivot];
            let g = gcd(x, y)?;
            let (scale, factor) = (y / g, x / g);
            for (v, b) in vector.iter_mut().zip(basis) {
                *v = v.checked_mul(scale)?.checked_sub(b.checked_mul(factor)?)?;
            }
            make_primitive(&mut vector)?;
        }
        Some(vector)
    }

    fn insert(&mut self, vector: Vec<i128>) -> Option<()> {
        let vector = self.reduce(vector)?;
        if let Some(pivot) = vector.iter().position(|&x| x != 0) {
            let at = self.rows.partition_point(|(p, _)| *p < pivot);
            self.rows.insert(at, (pivot, vector));
        }
        Some(())
    }

    /// Whether `vector` lies in the row space.
    fn spans(&self, vector: Vec<i128>) -> Option<bool> {
        Some(self.reduce(vector)?.iter().all(|&x| x == 0))
    }
}

fn gcd(a: i128, b: i128) -> Option<i128> {
    let (mut a, mut b) = (a.unsigned_abs(), b.unsigned_abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    i128::try_from(a).ok()
}

fn make_primitive(vector: &mut [i128]) -> Option<()> {
    let mut g = 0;
    for &x in vector.iter() {
        g = gcd(g, x)?;
    }
    if g > 1 {
        vector.iter_mut().for_each(|x| *x /= g);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(key: &[&str], patients: u64) -> CellCount {
        CellCount {
            key: key.iter().map(|s| s.to_string()).collect(),
            patients,
        }
    }

    /// Deterministic PRNG for the property test (Steele et al. 2014, SplitMix64).
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Every row of the release rebuilt from the plan alone: (name,
    /// fine cells it sums, patients, published?).
    fn release_rows(
        plan: &Plan,
        cells: &[CellCount],
        attributes: usize,
    ) -> Vec<(String, Vec<usize>, u64, bool)> {
        let mut rows = Vec::new();
        if attributes >= 1 {
            for (i, c) in cells.iter().enumerate() {
                rows.push((
                    format!("cell {:?}", c.key),
                    vec![i],
                    c.patients,
                    plan.cells[i],
                ));
            }
        }
        for ((a, v), &(patients, published)) in &plan.margins {
            let members: Vec<usize> = (0..cells.len())
                .filter(|&i| cells[i].key[*a] == *v)
                .collect();
            rows.push((format!("margin {a}={v}"), members, patients, published));
        }
        rows.push((
            "total".into(),
            (0..cells.len()).collect(),
            plan.total.0,
            plan.total.1,
        ));
        rows
    }

    /// Rank by floating-point elimination with partial pivoting: a second,
    /// independent implementation of the audit.
    fn rank(mut m: Vec<Vec<f64>>) -> usize {
        let width = m.first().map_or(0, Vec::len);
        let mut rank = 0;
        for col in 0..width {
            let Some(pivot) = (rank..m.len())
                .filter(|&r| m[r][col].abs() > 1e-9)
                .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            else {
                continue;
            };
            m.swap(rank, pivot);
            let pivot_row = m[rank].clone();
            for (r, row) in m.iter_mut().enumerate() {
                if r != rank {
                    let f = row[col] / pivot_row[col];
                    for (x, p) in row.iter_mut().zip(&pivot_row) {
                        *x -= f * p;
                    }
                }
            }
            rank += 1;
        }
        rank
    }

    /// Names of the suppressed rows that the published rows determine.
    fn disclosed(plan: &Plan, cells: &[CellCount], attributes: usize) -> Vec<String> {
        let rows = release_rows(plan, cells, attributes);
        let mut known = vec![false; cells.len()];
        for (_, members, _, published) in &rows {
            if *published && members.len() == 1 && attributes >= 1 {
                known[members[0]] = true;
            }
        }
        let unknown: Vec<usize> = (0..cells.len())
            .filter(|&i| cells[i].patients > 0 && !known[i] && !(attributes >= 1 && plan.cells[i]))
            .collect();
        let vector = |members: &[usize]| -> Vec<f64> {
            unknown
                .iter()
                .map(|u| if members.contains(u) { 1.0 } else { 0.0 })
                .collect()
        };
        let equations: Vec<Vec<f64>> = rows.iter().filter(|r| r.3).map(|r| vector(&r.1)).collect();
        let base = rank(equations.clone());
        rows.iter()
            .filter(|r| !r.3 && r.2 > 0)
            .filter(|r| {
                let mut with = equations.clone();
                with.push(vector(&r.1));
                rank(with) == base
            })
            .map(|r| r.0.clone())
            .collect()
    }

    /// The module's own exact audit, run fresh on the plan's flags.
    fn audit_fresh(plan: &Plan, cells: &[CellCount], attributes: usize) -> Option<usize> {
        let mut table = Table::new(cells, attributes);
        for row in &mut table.rows {
            let published = match &row.label {
                Label::Cell(i) => plan.cells[*i],
                Label::Margin(a, v) => plan.margins[&(*a, v.clone())].1,
                Label::Total => plan.total.1,
            };
            row.state = match (row.patients, published) {
                (0, _) => State::Empty,
                (_, true) => State::Published,
                (_, false) => State::Suppressed,
            };
        }
        table.first_disclosed()
    }

    /// Every published row has at least `k` patients, the listing matches
    /// the flags, and nothing suppressed is recoverable.
    fn check_plan(plan: &Plan, cells: &[CellCount], attributes: usize, k: u64) {
        let published = plan.published(cells, attributes);
        for (key, patients) in &published {
            assert!(
                *patients >= k && *patients > 0,
                "{key:?} published with {patients} < k={k}"
            );
            assert_eq!(key.len(), attributes);
        }
        let rows = release_rows(plan, cells, attributes);
        let flagged = rows.iter().filter(|r| r.3).count();
        assert_eq!(published.len(), flagged);
        assert_eq!(
            disclosed(plan, cells, attributes),
            Vec::<String>::new(),
            "{cells:?} k={k} {plan:?}"
        );
        assert_eq!(audit_fresh(plan, cells, attributes), None);
    }

    fn two_by_two(counts: [u64; 4]) -> Vec<CellCount> {
        vec![
            cell(&["65-79", "F"], counts[0]),
            cell(&["65-79", "M"], counts[1]),
            cell(&["80+", "F"], counts[2]),
            cell(&["80+", "M"], counts[3]),
        ]
    }

    #[test]
    fn one_small_cell_in_two_by_two_hides_a_cycle() {
        let cells = two_by_two([10, 3, 8, 9]);
        let plan = plan(&cells, 2, 5);
        assert!(!plan.cells[1], "the cell below k is published");
        assert_eq!(plan.primary, 1);
        let hidden_cells = plan.cells.iter().filter(|p| !**p).count();
        let margin_hidden = |a: usize, v: &str| !plan.margins[&(a, v.to_string())].1;
        assert!(hidden_cells >= 4 || (margin_hidden(0, "65-79") && margin_hidden(1, "M")));
        // With every margin published, the 2×2 cycle of four cells is the
        // smallest pattern that hides the small cell.
        assert_eq!(plan.cells, vec![false; 4]);
        assert!(plan.margins.values().all(|(_, published)| *published));
        assert_eq!(plan.total, (30, true));
        assert_eq!(plan.complementary, 3);
        check_plan(&plan, &cells, 2, 5);
    }

    #[test]
    fn k_above_every_cell_publishes_only_large_aggregates() {
        let cells = two_by_two([2, 3, 1, 4]);
        let plan = plan(&cells, 2, 5);
        assert_eq!(plan.cells, vec![false; 4]);
        assert_eq!(plan.primary, 4 + 1, "four cells and the margin F=3");
        check_plan(&plan, &cells, 2, 5);
        assert!(
            plan.total.1,
            "total 10 >= k with its margins hidden as needed"
        );
        for (_, patients) in plan.published(&cells, 2) {
            assert!(patients >= 5);
        }

        let tiny = two_by_two([1, 1, 1, 1]);
        let plan = super::plan(&tiny, 2, 5);
        assert!(plan.published(&tiny, 2).is_empty());
        assert_eq!(plan.primary, 4 + 4 + 1);
        assert_eq!(plan.complementary, 0);
    }

    #[test]
    fn no_attributes_publishes_the_total_or_nothing() {
        let big = [cell(&[], 7)];
        let plan = plan(&big, 0, 5);
        assert_eq!(plan.published(&big, 0), vec![(vec![], 7)]);
        assert_eq!((plan.cells.clone(), plan.total), (vec![true], (7, true)));
        assert!(plan.margins.is_empty());

        let small = [cell(&[], 3)];
        let plan = super::plan(&small, 0, 5);
        assert!(plan.published(&small, 0).is_empty());
        assert_eq!((plan.primary, plan.complementary), (1, 0));

        let plan = super::plan(&[], 0, 5);
        assert_eq!(plan.total, (0, false));
        assert_eq!((plan.primary, plan.complementary), (0, 0));
        assert!(plan.published(&[], 0).is_empty());
    }

    #[test]
    fn one_attribute_hides_a_second_cell_and_keeps_the_total() {
        let cells = [
            cell(&["icu"], 10),
            cell(&["ward"], 2),
            cell(&["ed"], 7),
            cell(&["hdu"], 0),
        ];
        let plan = plan(&cells, 1, 5);
        assert!(plan.margins.is_empty());
        assert_eq!(plan.cells, vec![true, false, false, false]);
        assert_eq!((plan.primary, plan.complementary), (1, 1));
        assert_eq!(
            plan.published(&cells, 1),
            vec![(vec!["icu".to_string()], 10), (vec!["*".to_string()], 19)]
        );
        check_plan(&plan, &cells, 1, 5);

        // The only other cell goes, and the total of 12 stays.
        let pair = [cell(&["icu"], 10), cell(&["ward"], 2)];
        let plan = super::plan(&pair, 1, 5);
        assert_eq!(plan.published(&pair, 1), vec![(vec!["*".to_string()], 12)]);
        check_plan(&plan, &pair, 1, 5);

        // Everything below k: nothing at all.
        let low = [cell(&["icu"], 3), cell(&["ward"], 0)];
        let plan = super::plan(&low, 1, 5);
        assert!(plan.published(&low, 1).is_empty());
        assert_eq!(plan.primary, 2);
    }

    #[test]
    fn large_cells_are_all_published() {
        let cells = two_by_two([10, 11, 12, 13]);
        let plan = plan(&cells, 2, 5);
        assert_eq!(plan.published(&cells, 2).len(), 4 + 4 + 1);
        assert_eq!((plan.primary, plan.complementary), (0, 0));
    }

    #[test]
    fn random_tables_leave_nothing_recoverable() {
        let mut rng = SplitMix64(0x5eed_2012_c0c5_1980);
        let mut suppressed = 0;
        for _ in 0..500 {
            let attributes = 2 + rng.below(2) as usize;
            let sizes: Vec<u64> = (0..attributes).map(|_| 1 + rng.below(4)).collect();
            let drop_empty = rng.below(4) == 0;
            let mut cells = Vec::new();
            let combinations: u64 = sizes.iter().product();
            for index in 0..combinations {
                let mut rest = index;
                let key = sizes
                    .iter()
                    .enumerate()
                    .map(|(a, &n)| {
                        let value = rest % n;
                        rest /= n;
                        format!("{a}v{value}")
                    })
                    .collect();
                let patients = match rng.below(10) {
                    0..=2 => 0,
                    3..=6 => 1 + rng.below(4),
                    _ => rng.below(13),
                };
                if !(drop_empty && patients == 0) {
                    cells.push(CellCount { key, patients });
                }
            }
            for i in (1..cells.len()).rev() {
                cells.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let k = 2 + rng.below(5);
            let plan = plan(&cells, attributes, k);
            check_plan(&plan, &cells, attributes, k);
            suppressed += plan.complementary;

            // No group with a published total leaves a hidden sum in 1..k.
            let hidden_sum = |members: &mut dyn Iterator<Item = (u64, bool)>| -> u64 {
                members
                    .filter(|(_, published)| !published)
                    .map(|(p, _)| p)
                    .sum()
            };
            for ((a, v), &(_, published)) in &plan.margins {
                if published {
                    let sum = hidden_sum(
                        &mut (0..cells.len())
                            .filter(|&i| cells[i].key[*a] == *v)
                            .map(|i| (cells[i].patients, plan.cells[i])),
                    );
                    assert!(sum == 0 || sum >= k, "margin {a}={v} hides {sum} < k={k}");
                }
            }
            if plan.total.1 {
                for a in 0..attributes {
                    let sum = hidden_sum(
                        &mut plan
                            .margins
                            .iter()
                            .filter(|((b, _), _)| *b == a)
                            .map(|(_, &m)| m),
                    );
                    assert!(
                        sum == 0 || sum >= k,
                        "total hides {sum} < k={k} over attribute {a}"
                    );
                }
            }
        }
        assert!(
            suppressed > 0,
            "the random tables should exercise complements"
        );
    }

    #[test]
    fn echelon_is_exact_on_dependent_rows() {
        let mut span = Echelon::default();
        span.insert(vec![1, 1, 0]).unwrap();
        span.insert(vec![0, 1, 1]).unwrap();
        assert_eq!(span.spans(vec![1, 0, -1]), Some(true));
        assert_eq!(span.spans(vec![1, 0, 0]), Some(false));
        assert_eq!(span.spans(vec![0, 0, 0]), Some(true));
    }
}
