import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

// `npm run dev` proxies the API to a running engine: WARDFLOW_HTTP=host:port (default 127.0.0.1:8080).
const engine = process.env.WARDFLOW_HTTP ?? '127.0.0.1:8080';
const target = /^https?:\/\//.test(engine) ? engine : `http://${engine}`;

export default defineConfig({
  base: '/',
  plugins: [react()],
  build: { outDir: 'dist', emptyOutDir: true, sourcemap: false },
  server: {
    proxy: {
      // SSE passes through the proxy unbuffered.
      '/v1': { target, changeOrigin: false },
    },
  },
});
