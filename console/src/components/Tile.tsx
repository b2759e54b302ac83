// One bed: vitals, NEWS2, alarm priority, stale and offline markers. Memoised: the stream keeps
// a tile's object identity until it changes, so only changed tiles re-render.
import { memo } from 'react';
import { age, fmt, useNow } from '../format';
import { patientHref } from '../router';
import type { Tile as TileT, Value } from '../types';

const ALARM_LABEL = { high: 'High alarm', medium: 'Medium alarm', low: 'Low alarm' } as const;

function StaleAge({ t }: { t: number }) {
  const now = useNow(1000);
  return <span className="stale-mark">stale {age(t, now)}</span>;
}

type CellProps = {
  id: string;
  label: string;
  unit: string;
  text: string;
  value: Value | undefined;
  extra?: React.ReactNode;
  className?: string;
};

function Cell({ id, label, unit, text, value, extra, className }: CellProps) {
  const stale = value?.stale ?? false;
  return (
    <div
      className={`vital${stale ? ' is-stale' : ''}${className ? ' ' + className : ''}`}
      data-testid={id}
      data-stale={String(stale)}
      data-t={value ? String(value.t) : ''}
    >
      <span className="vital-label">{label}</span>
      <span className="vital-value">
        {text}
        {value && <span className="vital-unit"> {unit}</span>}
      </span>
      {extra}
      {stale && value && <StaleAge t={value.t} />}
    </div>
  );
}

function TileView({ tile }: { tile: TileT }) {
  const p = tile.patient;
  const v = tile.values;
  const base = `tile-${p}`;
  const bp = v.sbp ?? v.dbp;
  const bpValue: Value | undefined = bp && {
    v: bp.v,
    t: Math.max(v.sbp?.t ?? 0, v.dbp?.t ?? 0),
    stale: (v.sbp?.stale ?? false) || (v.dbp?.stale ?? false),
  };
  const n = tile.news2;
  const newsValue: Value | undefined = n ? { v: n.score, t: n.t, stale: false } : undefined;
  return (
    <a
      href={patientHref(p)}
      className={`tile alarm-${tile.alarm ?? 'none'}${tile.offline ? ' is-offline' : ''}`}
      data-testid={base}
      data-alarm={tile.alarm ?? ''}
      data-offline={String(tile.offline)}
    >
      <div className="tile-head">
        <span className="tile-bed">{tile.bed || '—'}</span>
        <span className="tile-patient">{p}</span>
        {tile.via !== 'unit' && tile.via !== 'own' && tile.via !== 'admin' && (
          <span className="badge badge-via">{tile.via === 'emergency' ? 'break-glass' : 'by consent'}</span>
        )}
      </div>
      <div className="tile-flags">
        {tile.alarm && <span className={`badge prio-${tile.alarm}`}>{ALARM_LABEL[tile.alarm]}</span>}
        {tile.offline && <span className="badge badge-offline">offline</span>}
      </div>
      <div className="tile-grid">
        <Cell id={`${base}-hr`} label="HR" unit="/min" text={fmt(v.hr?.v)} value={v.hr} className="big" />
        <Cell id={`${base}-spo2`} label="SpO₂" unit="%" text={fmt(v.spo2?.v)} value={v.spo2} className="big" />
        <Cell id={`${base}-rr`} label="RR" unit="/min" text={fmt(v.rr?.v)} value={v.rr} />
        <Cell
          id={`${base}-bp`}
          label="BP"
          unit="mmHg"
          text={bp ? `${fmt(v.sbp?.v)}/${fmt(v.dbp?.v)}` : '–'}
          value={bpValue}
        />
        <Cell id={`${base}-temp`} label="Temp" unit="°C" text={fmt(v.temp?.v, 1)} value={v.temp} />
        <Cell
          id={`${base}-news2`}
          label="NEWS2"
          unit=""
          text={n ? String(n.score) : '–'}
          value={newsValue}
          className={n ? `news-${n.risk}` : undefined}
          extra={n && <span className="news-risk">{n.risk}</span>}
        />
      </div>
    </a>
  );
}

export const Tile = memo(TileView);
