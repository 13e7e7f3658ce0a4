// luahealth runs Argo CD resource health tests: for each health_test.yaml under the given
// folders (Argo CD's resource_customizations layout, <group>/<kind>/), it runs the health.lua
// beside it on every testdata object and compares the returned status and message.
//
// It runs scripts as Argo CD's util/lua does: gopher-lua, the object decoded into the global
// `obj`, a one-second limit. By default only the libraries Argo CD opens for scripts set in
// argocd-cm (package, base, table; os is its safe subset, left out here): a script that needs
// `string` or `math` there fails here too. -open-libs runs with every library, as Argo CD does
// for its built-in scripts.
//
//	luahealth [-open-libs] DIR...
//	luahealth -eval health.lua OBJECT.yaml...   # print {"status","message"} of each object, one JSON a line
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

type healthStatus struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type testCase struct {
	InputPath    string       `json:"inputPath"`
	HealthStatus healthStatus `json:"healthStatus"`
}

type testFile struct {
	Tests []testCase `json:"tests"`
}

var validStatus = map[string]bool{"Healthy": true, "Progressing": true, "Degraded": true,
	"Suspended": true, "Missing": true, "Unknown": true}

func newState(openLibs bool) *lua.LState {
	l := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	if !openLibs {
		for _, lib := range []struct {
			name string
			open lua.LGFunction
		}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
			if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true},
				lua.LString(lib.name)); err != nil {
				panic(err)
			}
		}
	}
	return l
}

// decode turns a decoded YAML/JSON value into Lua values the way Argo CD's decodeValue does.
func decode(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []any:
		arr := l.CreateTable(len(v), 0)
		for _, item := range v {
			arr.Append(decode(l, item))
		}
		return arr
	case map[string]any:
		tbl := l.CreateTable(0, len(v))
		for key, item := range v {
			tbl.RawSetH(lua.LString(key), decode(l, item))
		}
		return tbl
	}
	return lua.LNil
}

func runHealth(script string, obj map[string]any, openLibs bool) (healthStatus, error) {
	l := newState(openLibs)
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", decode(l, obj))
	if err := l.DoString(script); err != nil {
		return healthStatus{}, err
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return healthStatus{}, fmt.Errorf("expect table output from Lua script, not %s", l.Get(-1).Type())
	}
	result := healthStatus{Status: lua.LVAsString(table.RawGetString("status")),
		Message: lua.LVAsString(table.RawGetString("message"))}
	if !validStatus[result.Status] {
		return healthStatus{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return result, nil
}

func readYAML(path string, into any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return yaml.Unmarshal(data, into)
}

// runFolder runs one health_test.yaml; it returns the number of cases and of failures.
func runFolder(testPath string, openLibs bool) (int, int, error) {
	dir := filepath.Dir(testPath)
	script, err := os.ReadFile(filepath.Join(dir, "health.lua"))
	if err != nil {
		return 0, 0, err
	}
	var tests testFile
	if err := readYAML(testPath, &tests); err != nil {
		return 0, 0, fmt.Errorf("%s: %w", testPath, err)
	}
	if len(tests.Tests) == 0 {
		return 0, 0, fmt.Errorf("%s: no tests", testPath)
	}
	failures := 0
	for _, tc := range tests.Tests {
		var obj map[string]any
		if err := readYAML(filepath.Join(dir, tc.InputPath), &obj); err != nil {
			return 0, 0, fmt.Errorf("%s: %w", tc.InputPath, err)
		}
		got, err := runHealth(string(script), obj, openLibs)
		name := filepath.Join(dir, tc.InputPath)
		switch {
		case err != nil:
			failures++
			fmt.Printf("FAIL %s: %v\n", name, err)
		case got != tc.HealthStatus:
			failures++
			fmt.Printf("FAIL %s:\n  want %s %q\n  got  %s %q\n", name, tc.HealthStatus.Status,
				tc.HealthStatus.Message, got.Status, got.Message)
		default:
			fmt.Printf("ok   %s: %s %q\n", name, got.Status, got.Message)
		}
	}
	return len(tests.Tests), failures, nil
}

// evaluate prints the health of live objects (the e2e tests export them with kubectl).
func evaluate(scriptPath string, objects []string, openLibs bool) error {
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		return err
	}
	for _, path := range objects {
		var obj map[string]any
		if err := readYAML(path, &obj); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		got, err := runHealth(string(script), obj, openLibs)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		line, _ := json.Marshal(got)
		fmt.Println(string(line))
	}
	return nil
}

func main() {
	openLibs := flag.Bool("open-libs", false, "open every Lua library, as for Argo CD's built-in scripts")
	eval := flag.String("eval", "", "a health.lua to run on the object files given as arguments")
	flag.Parse()
	if *eval != "" {
		if err := evaluate(*eval, flag.Args(), *openLibs); err != nil {
			fmt.Fprintln(os.Stderr, "luahealth:", err)
			os.Exit(2)
		}
		return
	}
	total, failed := 0, 0
	for _, root := range flag.Args() {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || d.Name() != "health_test.yaml" {
				return err
			}
			n, f, err := runFolder(path, *openLibs)
			total, failed = total+n, failed+f
			return err
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, "luahealth:", err)
			os.Exit(2)
		}
	}
	if total == 0 {
		fmt.Fprintln(os.Stderr, "luahealth: no health_test.yaml found under", flag.Args())
		os.Exit(2)
	}
	fmt.Printf("%d passed, %d failed\n", total-failed, failed)
	if failed > 0 {
		os.Exit(1)
	}
}
