// One uPlot chart. Created once; later data arrives through setData, the x range through
// setScale and vertical markers (alert transitions, observations) through a draw hook.
import { useEffect, useRef } from 'react';
import uPlot from 'uplot';
import { clock } from '../format';

export type Marker = { t: number /* s */; color: string; dashed?: boolean; label: string };
export type SeriesDef = { label: string; color: string };

type Props = {
  testid: string;
  title: string;
  unit: string;
  series: SeriesDef[];
  data: uPlot.AlignedData;
  /** Bumped when `data`'s arrays were appended to in place. */
  version: number;
  range: [number, number];
  markers: Marker[];
  digits?: number;
};

const AXIS = '#c9ced6';
const GRID = '#2b313a';
const pad = (n: number) => String(n).padStart(2, '0');

function markersPlugin(markers: { current: Marker[] }): uPlot.Plugin {
  return {
    hooks: {
      draw: [
        (u) => {
          const { ctx } = u;
          const { left, top, width, height } = u.bbox;
          const min = u.scales.x.min ?? -Infinity;
          const max = u.scales.x.max ?? Infinity;
          ctx.save();
          ctx.beginPath();
          ctx.rect(left, top, width, height);
          ctx.clip();
          ctx.lineWidth = Math.max(1, devicePixelRatio);
          for (const m of markers.current) {
            if (m.t < min || m.t > max) continue;
            const x = Math.round(u.valToPos(m.t, 'x', true)) + 0.5;
            ctx.strokeStyle = m.color;
            ctx.setLineDash(m.dashed ? [4 * devicePixelRatio, 3 * devicePixelRatio] : []);
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
          }
          ctx.restore();
        },
      ],
    },
  };
}

export function TrendChart({ testid, title, unit, series, data, version, range, markers, digits = 0 }: Props) {
  const box = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const rangeRef = useRef(range);
  const markersRef = useRef(markers);

  useEffect(() => {
    const el = box.current!;
    const fmtVal = (_u: uPlot, v: number | null) => (v == null ? '–' : v.toFixed(digits));
    const opts: uPlot.Options = {
      width: Math.max(300, el.clientWidth),
      height: 180,
      cursor: { sync: { key: 'trend' }, drag: { x: false, y: false, setScale: false } },
      scales: { x: { time: true, range: () => rangeRef.current } },
      axes: [
        {
          stroke: AXIS,
          grid: { stroke: GRID },
          ticks: { stroke: GRID },
          values: (_u, splits) =>
            splits.map((s) => {
              const d = new Date(s * 1000);
              return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
            }),
        },
        { stroke: AXIS, grid: { stroke: GRID }, ticks: { stroke: GRID }, size: 48 },
      ],
      series: [
        { label: 'time', value: (_u, v) => (v == null ? '–' : clock(v * 1000)) },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 1.5,
          spanGaps: true,
          points: { show: false },
          value: fmtVal,
        })),
      ],
      plugins: [markersPlugin(markersRef)],
    };
    const u = new uPlot(opts, data, el);
    plot.current = u;
    const ro = new ResizeObserver(() => {
      const w = Math.max(300, el.clientWidth);
      if (w !== u.width) u.setSize({ width: w, height: 180 });
    });
    ro.observe(el);
    return () => {
      ro.disconnect();
      u.destroy();
      plot.current = null;
    };
    // Created once per mount; updates below go through setData / setScale / redraw.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, []);

  useEffect(() => {
    plot.current?.setData(data);
  }, [data, version]);

  useEffect(() => {
    rangeRef.current = range;
    plot.current?.setScale('x', { min: range[0], max: range[1] });
  }, [range]);

  useEffect(() => {
    markersRef.current = markers;
    plot.current?.redraw(false);
  }, [markers]);

  return (
    <figure className="chart" data-testid={testid}>
      <figcaption>
        {title} {unit && <span className="muted">({unit})</span>}
      </figcaption>
      <div ref={box} className="chart-box" />
    </figure>
  );
}
