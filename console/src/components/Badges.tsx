// Small text-and-colour labels, so colour is never the only cue.
import type { Alert, Priority } from '../types';

export function PriorityBadge({ p }: { p: Priority }) {
  return <span className={`badge prio-${p}`}>{p}</span>;
}

export function StateLabel({ a }: { a: Alert }) {
  // Escalated alerts carry their tier; an acknowledged one keeps the mark of its last tier.
  const escalated = a.state === 'escalated' || a.tier > 1;
  return (
    <>
      {a.state !== 'escalated' && <span className={`state state-${a.state}`}>{a.state}</span>}
      {escalated && <span className="badge badge-escalated">escalated, tier {a.tier}</span>}
    </>
  );
}

export function alertValues(a: Alert): string {
  return a.values
    .map((v) => `${v.name} ${Number.isFinite(v.value) ? +v.value.toFixed(2) : v.value}${v.note ? ` (${v.note})` : ''}`)
    .join(', ');
}
