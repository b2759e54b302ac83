// A column header that sorts its table; announces the order with aria-sort.
export type SortDir = 'ascending' | 'descending';
export type Sort<K extends string> = { key: K; dir: SortDir };

type Props<K extends string> = {
  label: string;
  column: K;
  sort: Sort<K>;
  onSort: (s: Sort<K>) => void;
  /** Direction used when the column is first chosen. */
  first?: SortDir;
};

export function SortHeader<K extends string>({ label, column, sort, onSort, first = 'ascending' }: Props<K>) {
  const active = sort.key === column;
  const next: SortDir = active ? (sort.dir === 'ascending' ? 'descending' : 'ascending') : first;
  return (
    <th scope="col" aria-sort={active ? sort.dir : 'none'}>
      <button type="button" className="sort" onClick={() => onSort({ key: column, dir: next })}>
        {label}
        <span aria-hidden="true" className="sort-mark">
          {active ? (sort.dir === 'ascending' ? ' ▲' : ' ▼') : ' ↕'}
        </span>
      </button>
    </th>
  );
}
