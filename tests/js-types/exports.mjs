// Prints {runtime, declared, errors}: the names redwire.js exports, the value names
// redwire.d.ts declares (read with TypeScript's own API), and the declarations' errors.
// Usage: node exports.mjs path/to/redwire.js path/to/redwire.d.ts
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const [js, dts] = process.argv.slice(2);
const ts = createRequire(import.meta.url)("typescript");
const rw = await import(pathToFileURL(js).href);
const program = ts.createProgram([dts], {
  strict: true,
  noEmit: true,
  lib: ["lib.es2022.d.ts", "lib.dom.d.ts"],
  types: [],
});
const checker = program.getTypeChecker();
const module = checker.getSymbolAtLocation(program.getSourceFile(dts));
const declared = checker
  .getExportsOfModule(module)
  .filter((symbol) => symbol.flags & ts.SymbolFlags.Value)
  .map((symbol) => symbol.name)
  .sort();
const errors = ts
  .getPreEmitDiagnostics(program)
  .map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n"));
console.log(JSON.stringify({ runtime: Object.keys(rw).sort(), declared, errors }));
