// Unit overview: tiles grouped by unit, sorted by bed.
import { useMemo } from 'react';
import { Tile } from '../components/Tile';
import { useLive } from '../stream';
import type { Tile as TileT } from '../types';

const natural = (a: string, b: string) => a.localeCompare(b, undefined, { numeric: true });

export function OverviewPage() {
  const { tiles, connection } = useLive();
  const units = useMemo(() => {
    const byUnit = new Map<string, TileT[]>();
    for (const t of tiles.values()) {
      const list = byUnit.get(t.unit) ?? [];
      list.push(t);
      byUnit.set(t.unit, list);
    }
    return [...byUnit.entries()]
      .sort(([a], [b]) => natural(a, b))
      .map(([unit, list]) => [unit, list.sort((x, y) => natural(x.bed, y.bed) || natural(x.patient, y.patient))] as const);
  }, [tiles]);

  return (
    <section aria-labelledby="overview-title">
      <h1 id="overview-title" className="visually-hidden">Unit overview</h1>
      {units.length === 0 && (
        <p className="muted">{connection === 'open' ? 'No beds to show.' : 'Waiting for the live feed…'}</p>
      )}
      {units.map(([unit, list]) => (
        <section key={unit} className="unit" aria-labelledby={`unit-${unit}`}>
          <h2 id={`unit-${unit}`}>
            {unit || 'No unit'} <span className="muted">({list.length})</span>
          </h2>
          <div className="tiles">
            {list.map((t) => (
              <Tile key={t.patient} tile={t} />
            ))}
          </div>
        </section>
      ))}
    </section>
  );
}
